"""The compiled CPU kernels (ddpm_jax/models/cpu_kernels.py: SiLU, LayerNorm, convolution)
against JAX's own, and their fallbacks."""

import ctypes
import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import cpu_kernels

needs_kernels = pytest.mark.skipif(jax.default_backend() != "cpu" or not cpu_kernels.available(),
                                   reason="the CPU kernels are not built here (no C++ compiler, or not on a CPU)")

# Past about -87 the kernel's exp saturates: both are 0 to within 1e-36 there.
EXTREMES = np.array([-1e4, -200, -100, -88, -87, -30, -1, -1e-3, 0, 1e-3, 1, 30, 88, 100, 1e4], np.float32)


def values():
    x = np.random.default_rng(0).normal(scale=6.0, size=(3, 7, 5, 10)).astype(np.float32)
    x.flat[: EXTREMES.size] = EXTREMES
    return jnp.asarray(x)


@needs_kernels
def test_silu_and_its_gradient_match_jax_nn_silu_to_float_rounding():
    x = values()
    np.testing.assert_allclose(jax.jit(cpu_kernels.silu)(x), jax.nn.silu(x), rtol=1e-6, atol=1e-6)

    def loss(silu):
        return lambda x: jnp.sum(jnp.sin(silu(x)))  # a cotangent that varies per element

    np.testing.assert_allclose(jax.jit(jax.grad(loss(cpu_kernels.silu)))(x), jax.grad(loss(jax.nn.silu))(x),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(cpu_kernels.silu)(x), jax.nn.silu(x), rtol=1e-6, atol=1e-6)


@needs_kernels
def test_silu_of_x_plus_a_bias_and_its_gradients_match_jax():
    # A layer's bias and SiLU in one kernel: the bias runs along the last axis (10 channels: runs of 160)
    x = values()
    bias = jnp.asarray(np.random.default_rng(2).normal(scale=3.0, size=(10,)).astype(np.float32))
    reference = lambda x, b: jax.nn.silu(x + b)  # noqa: E731
    np.testing.assert_allclose(jax.jit(cpu_kernels.silu)(x, bias), reference(x, bias), rtol=1e-6, atol=1e-6)

    def loss(silu):
        return lambda x, b: jnp.sum(jnp.sin(silu(x, b)))

    grads = jax.jit(jax.grad(loss(cpu_kernels.silu), argnums=(0, 1)))(x, bias)
    for got, want in zip(grads, jax.grad(loss(reference), argnums=(0, 1))(x, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for empty in (jnp.zeros((2, 0, 10)), jnp.zeros((2, 3, 0))):
        assert jax.jit(cpu_kernels.silu)(empty, jnp.zeros(empty.shape[-1:])).shape == empty.shape
    biases = jnp.stack([bias, -bias, 2 * bias])  # one bias per example, too
    for in_axes, b in (((0, None), bias), ((0, 0), biases)):
        np.testing.assert_allclose(jax.vmap(cpu_kernels.silu, in_axes)(x, b), jax.vmap(reference, in_axes)(x, b),
                                   rtol=1e-6, atol=1e-6)


@needs_kernels
def test_the_article_unet_on_the_cpu_calls_the_kernel():
    """The model really takes the kernel's path (not jax.nn.silu's) when it is available."""
    from ddpm_jax.config import base_config
    from ddpm_jax.models import create_model

    model = create_model(base_config(), (28, 28, 1))
    x, t = jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)
    hlo = jax.jit(model.apply).lower(params, x, t).compile().as_text()
    assert cpu_kernels._SILU in hlo and cpu_kernels._BIAS_SILU in hlo and cpu_kernels._CONV in hlo


# Kernel size, padding, image (B, H, W), channels in and out. On AVX2 (AVX-512) 40 output channels
# are five (three) vectors, two tile groups (one); 160 are five (three) groups. Nine images: the
# kernel gradient sums them in nine chunks on the pool. It takes inputs of 4 channels or more a
# tap at a time, in blocks of input channels: 7 channels make a block of 8 whose last is dropped.
# Outputs of 1 (from 10), 9, 10, 12, 20 and 25 channels take the planar form (25: blocks of 9, 9
# and 7), and so do the input gradients of 2, 3, 6, 7, 10 and 20 channels; 1 -> 1 does not (9
# multiply-adds per output). Kernel gradients of images of 128 pixels or more with such outputs
# take the planar form too, in tiles of R rows (tap, ci) x OB output channels: 28x28 10 -> 10
# (R 4, OB 5, two padding rows), 14x14 20 -> 20 (5, 4), 14x14 10 -> 1 (15, 1), 12x13 7 -> 1 (9, 2:
# a padding channel), 7 -> 9 (7, 3), 3 -> 12 (7, 3: rows of several taps, a padding row) and
# 2x2 13x12 5 -> 7 (5, 4: a padding channel).
@needs_kernels
@pytest.mark.parametrize("kernel, padding, shape, c, o", [
    (3, 1, (9, 28, 28), 10, 10), (3, 1, (2, 7, 5), 20, 40), (2, 0, (3, 6, 6), 40, 40), (2, 1, (2, 6, 6), 40, 40),
    (3, 0, (2, 5, 4), 1, 1), (3, 1, (2, 3, 3), 40, 160), (1, 0, (2, 4, 4), 3, 70), (4, 2, (1, 3, 5), 2, 9),
    (3, 1, (2, 6, 5), 7, 12), (3, 1, (3, 14, 14), 20, 20), (3, 1, (2, 9, 11), 6, 25), (3, 1, (2, 7, 7), 10, 1),
    (3, 1, (2, 14, 14), 10, 1), (3, 1, (2, 12, 13), 7, 1), (3, 1, (2, 12, 13), 7, 9), (3, 1, (2, 12, 13), 3, 12),
    (2, 0, (2, 13, 12), 5, 7)])
def test_conv_and_its_gradients_match_lax(kernel, padding, shape, c, o):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=shape + (c,)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, c, o)).astype(np.float32))
    reference = functools.partial(cpu_kernels._xla_conv, padding=padding)
    ours = functools.partial(cpu_kernels._conv, padding=padding)  # the kernel, whether or not it pays here
    want = reference(x, w)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(jax.jit(ours)(x, w), want, rtol=0, atol=2e-6 * scale)

    cotangent = jnp.asarray(rng.normal(size=want.shape).astype(np.float32))

    def loss(conv):
        return lambda x, w: jnp.sum(conv(x, w) * cotangent)

    got_grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
    for got, want_grad in zip(got_grads, jax.grad(loss(reference), argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(got, want_grad, rtol=0, atol=2e-6 * float(jnp.abs(want_grad).max()))


@needs_kernels
def test_conv_under_vmap_and_on_empty_batches():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 4)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)).astype(np.float32))
    for in_axes, kernel in (((0, None), w[0]), ((0, 0), w)):  # one kernel for all, or one each
        np.testing.assert_allclose(jax.vmap(functools.partial(cpu_kernels._conv, padding=1), in_axes)(x, kernel),
                                   jax.vmap(functools.partial(cpu_kernels._xla_conv, padding=1), in_axes)(x, kernel),
                                   rtol=1e-5, atol=1e-5)
    empty = jnp.zeros((0, 6, 6, 4))
    assert jax.jit(functools.partial(cpu_kernels._conv, padding=1))(empty, w[0]).shape == (0, 6, 6, 5)
    grad = jax.grad(lambda w: jnp.sum(cpu_kernels._conv(empty, w, 1)))(w[0])
    assert grad.shape == w[0].shape and not jnp.any(grad)


@needs_kernels
def test_conv_takes_the_kernel_where_it_beats_xla():
    def uses_kernel(k, c, o, padding=1):
        x, w = jnp.zeros((2, 7, 7, c)), jnp.zeros((k, k, c, o))
        return cpu_kernels._CONV in str(jax.make_jaxpr(cpu_kernels.conv, static_argnums=2)(x, w, padding))

    assert uses_kernel(3, 10, 10) and uses_kernel(3, 80, 20) and uses_kernel(2, 160, 40, padding=0)
    assert not uses_kernel(1, 10, 10, padding=0)
    # wide 3 x 3 layers: only where the kernel was compiled for AVX-512's 16-float vectors
    assert uses_kernel(3, 32, 64) == (cpu_kernels._library().DdpmJaxVectorLanes() == 16)
    assert not uses_kernel(3, 256, 256)
    assert not uses_kernel(3, 10, 10, padding=3)  # padding >= k: lax's convolution


def test_other_dtypes_and_a_disabled_kernel_use_jax_nn_silu(monkeypatch):
    x = values().astype(jnp.bfloat16)
    assert jnp.array_equal(cpu_kernels.silu(x), jax.nn.silu(x))
    assert not cpu_kernels._enabled({"DDPM_JAX_CPU_KERNELS": "off"})
    assert cpu_kernels._enabled({})


def test_without_a_compiler_or_with_a_failing_build_there_is_no_kernel(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    assert cpu_kernels._build() is None
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels._build() is None
    assert "could not build the CPU kernels" in caplog.text
    assert not list(tmp_path.rglob("*.so"))  # no partial build left behind


# (40, 28, 28, 10): rows in five chunks on the thread pool, each summing its own scale and bias gradients
@needs_kernels
@pytest.mark.parametrize("shape", [(4, 7, 7, 20), (40, 28, 28, 10)])
def test_layer_norm_and_its_gradients_match_the_jax_formula(shape):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(3.0, 2.0, size=shape).astype(np.float32))
    scale = jnp.asarray(rng.normal(1.0, 0.3, size=shape[1:]).astype(np.float32))
    bias = jnp.asarray(rng.normal(0.0, 0.3, size=shape[1:]).astype(np.float32))

    def reference(x, scale, bias):  # torch.nn.LayerNorm((C, H, W)) over (H, W, C), eps 1e-5
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        var = ((x - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

    kernel = lambda x, s, b: cpu_kernels.layer_norm(x, s, b, 1e-5)  # noqa: E731
    np.testing.assert_allclose(jax.jit(kernel)(x, scale, bias), reference(x, scale, bias), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * weights)  # noqa: E731
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(x, scale, bias)
    expected = jax.grad(loss(reference), argnums=(0, 1, 2))(x, scale, bias)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(kernel, in_axes=(0, None, None))(x, scale, bias), reference(x, scale, bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler here")
def test_the_kernels_build_from_source_into_an_empty_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cpu_kernels._build()
    assert path is not None and path.startswith(str(tmp_path)), path
    library = ctypes.CDLL(path)
    for handler in ("DdpmJaxSilu", "DdpmJaxSiluAndSigmoid", "DdpmJaxSiluGrad", "DdpmJaxLayerNorm", "DdpmJaxLayerNormGrad"):
        assert getattr(library, handler)
    assert cpu_kernels._build() == path  # found in the cache: built once
    assert len(list(tmp_path.rglob("*.so"))) == 1
