"""SiLU, LayerNorm and small convolutions as compiled CPU kernels through the XLA FFI, where XLA:CPU's own code is slow.

`silu(x)` is jax.nn.silu's function (`silu(x, bias)`: of x + bias, a layer's bias added in the
same pass), `layer_norm(x, scale, bias, eps)` torch.nn.LayerNorm's and `conv(x, kernel, padding)`
a stride-1 NHWC convolution's, each with its gradients. On the CPU, for float32, they call the loops in `cpu_kernels.cc`
(forward and backward), which this module compiles once with the system's C++ compiler into
~/.cache/ddpm_jax/kernels (or $XDG_CACHE_HOME/ddpm_jax/kernels) and registers with XLA.
Anywhere else (GPU, TPU, bfloat16), and wherever no compiler is found or the build fails
(logged once), they are plain JAX: nothing to install. DDPM_JAX_CPU_KERNELS=off turns the
kernels off. Both paths agree to float rounding (tests/test_cpu_kernels.py).

Why: XLA:CPU's loop emitter vectorises an elementwise fusion that holds a broadcast (a bias, a
constant, a per-example mean) along its innermost dimension only: a few lanes at a time for the
10- and 20-channel activations of the article's U-Net. jax.nn.silu there costs ~0.8 ms per
million elements on this project's AVX-512 CPU against ~0.2 ms on 40 channels or a flat array
(`python benchmarks/elementwise.py`; README: Where the time goes). The kernels run over the
flat buffer, as wide as the CPU's vectors, on XLA's intra-op thread pool. XLA:CPU's convolutions
of 10-40 channels run at a fraction of the vector unit's rate too (its kernel gradients at ~10
GFLOP/s for 28x28x10 -> 10); the convolution kernel computes tiles of pixels x output channels in
registers, 60-90 GFLOP/s on two AVX2 cores (`python benchmarks/conv_layers.py`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import runtime

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
# -fno-trapping-math lets gcc turn exp_approx's clamp into vector selects without AVX-512's masks
# (on AVX2 the SiLU loops stayed scalar without it: 1.8 against 0.35 ms per million elements);
# -fopenmp-simd honours the loops' `omp simd` reductions and needs no OpenMP runtime.
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
          "-fopenmp-simd", "-w")
_SILU, _SILU_AND_SIGMOID, _SILU_GRAD = "ddpm_jax_silu", "ddpm_jax_silu_and_sigmoid", "ddpm_jax_silu_grad"
_BIAS_SILU, _BIAS_SILU_AND_SIGMOID = "ddpm_jax_bias_silu", "ddpm_jax_bias_silu_and_sigmoid"
_LAYER_NORM, _LAYER_NORM_GRAD = "ddpm_jax_layer_norm", "ddpm_jax_layer_norm_grad"
_CONV, _CONV_KERNEL_GRAD = "ddpm_jax_conv", "ddpm_jax_conv_kernel_grad"


def _enabled(environ=os.environ) -> bool:
    return runtime.switched_on("DDPM_JAX_CPU_KERNELS", environ)


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and flags (a cache shared by two machines
    must not hand one the other's build)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return ""


def _build() -> str | None:
    """The path of the compiled kernels, building them on first use; None without a compiler
    or when the build fails (logged once)."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return None
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), compiler.encode(),
                                     jax.__version__.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "ddpm_jax", "kernels")
    path = os.path.join(cache, f"cpu_kernels-{key}.so")
    if os.path.exists(path):
        return path
    log = logging.getLogger(__name__).warning
    try:
        os.makedirs(cache, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
    except OSError as error:
        log("ddpm_jax: cannot write the CPU kernels to %s (%s); using jax.nn.silu", cache, error)
        return None
    try:
        command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", partial]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
        os.replace(partial, path)  # atomic: processes building at once each install a whole file
    except (OSError, subprocess.SubprocessError) as error:
        detail = (getattr(error, "stderr", None) or b"").decode(errors="replace")[-500:]
        log("ddpm_jax: could not build the CPU kernels (%s) %s; using jax.nn.silu", error, detail)
        return None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def available() -> bool:
    """Whether the kernels are built and registered with XLA (once per process)."""
    return _library() is not None


@functools.cache
def _library():
    """The compiled kernels (a ctypes library), registered with XLA; None without them."""
    if not _enabled():
        return None
    path = _build()
    if path is None:
        return None
    import ctypes

    library = ctypes.cdll.LoadLibrary(path)
    # The elementwise ops, the normalisation's forward and the convolution act on each example
    # alone: under a sharded jit each device runs them on its part of the batch. The
    # normalisation's gradient and the convolution kernel's sum over the batch, so XLA gives
    # them the whole batch.
    for name, symbol, per_example in ((_SILU, library.DdpmJaxSilu, True),
                                      (_SILU_AND_SIGMOID, library.DdpmJaxSiluAndSigmoid, True),
                                      (_SILU_GRAD, library.DdpmJaxSiluGrad, True),
                                      (_BIAS_SILU, library.DdpmJaxBiasSilu, True),
                                      (_BIAS_SILU_AND_SIGMOID, library.DdpmJaxBiasSiluAndSigmoid, True),
                                      (_LAYER_NORM, library.DdpmJaxLayerNorm, True),
                                      (_LAYER_NORM_GRAD, library.DdpmJaxLayerNormGrad, False),
                                      (_CONV, library.DdpmJaxConv, True),
                                      (_CONV_KERNEL_GRAD, library.DdpmJaxConvKernelGrad, False)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
        if per_example:
            jax.ffi.register_ffi_target_as_batch_partitionable(name)
    return library


def _kernel_silu(x):
    return jax.ffi.ffi_call(_SILU, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="broadcast_all")(x)


def _kernel_silu_and_sigmoid(x):
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return tuple(jax.ffi.ffi_call(_SILU_AND_SIGMOID, (out, out), vmap_method="broadcast_all")(x))


def _jax_silu_and_sigmoid(x):
    s = jax.nn.sigmoid(x)
    return x * s, s


@jax.custom_vjp
def _silu(x):
    return jax.lax.platform_dependent(x, cpu=_kernel_silu, default=jax.nn.silu)


def _silu_forward(x):
    y, s = jax.lax.platform_dependent(x, cpu=_kernel_silu_and_sigmoid, default=_jax_silu_and_sigmoid)
    return y, (y, s)


def _kernel_silu_grad(y, s, dy):
    return jax.ffi.ffi_call(_SILU_GRAD, jax.ShapeDtypeStruct(y.shape, y.dtype), vmap_method="broadcast_all")(y, s, dy)


def _jax_silu_grad(y, s, dy):
    return dy * (s + y * (1 - s))


def _silu_backward(residuals, dy):
    return (jax.lax.platform_dependent(*residuals, dy, cpu=_kernel_silu_grad, default=_jax_silu_grad),)


_silu.defvjp(_silu_forward, _silu_backward)


def _kernel_bias_silu(x, bias):
    # vmap: one call per example (the kernel takes the channel count from the bias's size)
    return jax.ffi.ffi_call(_BIAS_SILU, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(x, bias)


def _kernel_bias_silu_and_sigmoid(x, bias):
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return tuple(jax.ffi.ffi_call(_BIAS_SILU_AND_SIGMOID, (out, out), vmap_method="sequential")(x, bias))


@jax.custom_vjp
def _bias_silu(x, bias):
    return jax.lax.platform_dependent(x, bias, cpu=_kernel_bias_silu, default=lambda x, b: jax.nn.silu(x + b))


def _bias_silu_forward(x, bias):
    y, s = jax.lax.platform_dependent(x, bias, cpu=_kernel_bias_silu_and_sigmoid,
                                      default=lambda x, b: _jax_silu_and_sigmoid(x + b))
    return y, (y, s)


def _bias_silu_backward(residuals, dy):
    (dz,) = _silu_backward(residuals, dy)
    return dz, jnp.sum(dz, axis=tuple(range(dz.ndim - 1)))


_bias_silu.defvjp(_bias_silu_forward, _bias_silu_backward)


def silu(x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x * sigmoid(x), elementwise, or SiLU of x + bias with bias (C,) along x's last axis (a
    layer's bias and activation in one pass); the compiled kernel for float32 on the CPU when available."""
    if x.dtype != jnp.float32 or not available() or (bias is not None and bias.dtype != jnp.float32):
        return jax.nn.silu(x if bias is None else x + bias)
    with jax.named_scope("silu"):  # names the kernel's ops as jax.nn.silu's are (benchmarks/step_profile.py)
        return _silu(x) if bias is None else _bias_silu(x, bias)


def _kernel_layer_norm(x, scale, bias, eps):
    rows = jax.ShapeDtypeStruct(x.shape[: x.ndim - scale.ndim], x.dtype)
    # vmap: one call per example (the kernel takes its row length from the scale's size)
    call = jax.ffi.ffi_call(_LAYER_NORM, (jax.ShapeDtypeStruct(x.shape, x.dtype), rows, rows),
                            vmap_method="sequential")
    return tuple(call(x, scale, bias, eps=np.float32(eps)))


def _jax_layer_norm(x, scale, bias, eps):
    axes = tuple(range(x.ndim - scale.ndim, x.ndim))
    mean = jnp.mean(x, axis=axes)
    centred = x - mean.reshape(mean.shape + (1,) * scale.ndim)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=axes) + eps)
    return centred * rstd.reshape(mean.shape + (1,) * scale.ndim) * scale + bias, mean, rstd


def _kernel_layer_norm_grad(x, scale, mean, rstd, dy):
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(scale.shape, x.dtype),
           jax.ShapeDtypeStruct(scale.shape, x.dtype))
    return tuple(jax.ffi.ffi_call(_LAYER_NORM_GRAD, out, vmap_method="sequential")(x, scale, mean, rstd, dy))


def _jax_layer_norm_grad(x, scale, mean, rstd, dy):
    axes = tuple(range(x.ndim - scale.ndim, x.ndim))
    expand = mean.shape + (1,) * scale.ndim
    x_hat = (x - mean.reshape(expand)) * rstd.reshape(expand)
    g = dy * scale
    dx = rstd.reshape(expand) * (g - jnp.mean(g, axis=axes, keepdims=True)
                                 - x_hat * jnp.mean(g * x_hat, axis=axes, keepdims=True))
    batch = tuple(range(x.ndim - scale.ndim))
    return dx, jnp.sum(dy * x_hat, axis=batch), jnp.sum(dy, axis=batch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_forward(x, scale, bias, eps)[0]


def _layer_norm_forward(x, scale, bias, eps):
    y, mean, rstd = jax.lax.platform_dependent(x, scale, bias, cpu=functools.partial(_kernel_layer_norm, eps=eps),
                                               default=functools.partial(_jax_layer_norm, eps=eps))
    return y, (x, scale, mean, rstd)


def _layer_norm_backward(eps, residuals, dy):
    return jax.lax.platform_dependent(*residuals, dy, cpu=_kernel_layer_norm_grad, default=_jax_layer_norm_grad)


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias, the mean and (biased) variance taken over x's
    trailing scale.ndim axes, one scale and bias per element of them (torch.nn.LayerNorm's
    function). x: (..., *S); scale, bias: S. The compiled kernel for float32 on the CPU when available."""
    if x.dtype != jnp.float32 or not available():
        return _jax_layer_norm(x, scale, bias, eps)[0]
    return _layer_norm(x, scale, bias, eps)


def _xla_conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _kernel_conv(x, kernel, padding):
    size = [n + 2 * padding - kernel.shape[0] + 1 for n in x.shape[1:3]]
    out = jax.ShapeDtypeStruct((*x.shape[:1], *size, kernel.shape[-1]), x.dtype)
    # vmap: one call per example (a batched kernel is a different convolution per example)
    return jax.ffi.ffi_call(_CONV, out, vmap_method="sequential")(x, kernel, padding=np.int64(padding))


def _kernel_conv_kernel_grad(x, dy, size, padding):
    out = jax.ShapeDtypeStruct((size, size, x.shape[-1], dy.shape[-1]), x.dtype)
    return jax.ffi.ffi_call(_CONV_KERNEL_GRAD, out, vmap_method="sequential")(
        x, dy, size=np.int64(size), padding=np.int64(padding))


def _kernel_conv_grads(x, kernel, dy, padding):
    # The input's gradient is the convolution of dy with the kernel flipped in space and its
    # channel axes swapped, padded by k - 1 - p (the full correlation, cut to x's size).
    k = kernel.shape[0]
    dx = _kernel_conv(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), k - 1 - padding)
    return dx, _kernel_conv_kernel_grad(x, dy, k, padding)


def _xla_conv_grads(x, kernel, dy, padding):
    return jax.vjp(functools.partial(_xla_conv, padding=padding), x, kernel)[1](dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, padding):
    return jax.lax.platform_dependent(x, kernel, cpu=functools.partial(_kernel_conv, padding=padding),
                                      default=functools.partial(_xla_conv, padding=padding))


def _conv_forward(x, kernel, padding):
    return _conv(x, kernel, padding), (x, kernel)


def _conv_backward(padding, residuals, dy):
    return jax.lax.platform_dependent(*residuals, dy, cpu=functools.partial(_kernel_conv_grads, padding=padding),
                                      default=functools.partial(_xla_conv_grads, padding=padding))


_conv.defvjp(_conv_forward, _conv_backward)


def _kernel_pays(k: int, c: int, o: int) -> bool:
    """Whether the kernel beats XLA:CPU on a stride-1 k x k convolution of c -> o channels
    (measured: benchmarks/conv_layers.py, README: Benchmarks). It does on 2 x 2 kernels and on
    3 x 3 ones of under 32 channels in or out (2-4x on 10-20 channels); on wider 3 x 3 layers of
    up to 128 channels only where it was compiled for 16-float vectors (AVX-512: 1.1-2x with the
    backward), as XLA's GEMM-based kernels win there on an AVX2 CPU, and at 256 channels on both."""
    wide_pays = max(c, o) <= 128 and _library().DdpmJaxVectorLanes() >= 16
    return k == 2 or (k == 3 and (min(c, o) < 32 or wide_pays))


def conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """A stride-1 convolution, square kernel, `padding` zero pixels on every side, no bias:
    lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p))) in NHWC / HWIO.
    x: (B, H, W, C), kernel: (k, k, C, O) -> (B, H + 2p - k + 1, W + 2p - k + 1, O). The compiled
    kernels (forward, input and kernel gradients) for float32 on the CPU when available,
    0 <= padding < k and the shape is one where they beat XLA (_kernel_pays); lax's
    convolution otherwise."""
    k = kernel.shape[0]
    if (x.ndim != 4 or kernel.ndim != 4 or kernel.shape[1] != k or not 0 <= padding < k
            or min(x.shape[1:3]) + 2 * padding < k or x.dtype != jnp.float32 or kernel.dtype != jnp.float32
            or not available() or not _kernel_pays(k, kernel.shape[2], kernel.shape[3])):
        return _xla_conv(x, kernel, padding)
    with jax.named_scope("conv"):
        return _conv(x, kernel, padding)
