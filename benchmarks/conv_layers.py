"""GFLOP/s of each convolution shape of the article's U-Net, XLA against PyTorch (oneDNN).

    python benchmarks/conv_layers.py [--batch 128] [--repeats 20] [--threads 2] [--json out.json]

For every distinct (size, in, out) of the model's 3x3 stride-1 convolutions (with how often
the model has it), and for its strided down-sampling convolutions and transposed (up-sampling)
convolutions, at the training batch, forward alone and forward + backward (gradients of input
and kernel), in these formulations:

- `xla`: lax.conv_general_dilated, NHWC / HWIO, as flax.linen.Conv runs it;
- `xla_pad16`: the same function with input and output channels zero-padded to a multiple of
  16 inside the call (the lead of issue 15: full AVX-512 vectors, up to 1.6x the FLOPs);
- `xla_transposed`: the forward written as the input gradient of a convolution with the
  flipped, transposed kernel (the form of XLA's backward convolutions);
- `kernel`: the layer as the article's U-Net computes it now: ddpm_jax.models.cpu_kernels.conv,
  the compiled CPU kernel (forward and both gradients), the stride-2 layers through
  convs.fast_conv / stride_two_conv_transpose (with DDPM_JAX_CPU_KERNELS=off: lax's
  convolutions in those forms);
- `torch`: torch.nn.functional.conv2d, NCHW as the article's model runs it (if torch is
  installed; `--threads` sets its threads).

GFLOP/s counts the useful work of the unpadded layer (2 * B * H * W * k * k * in * out for the
forward, over the output pixels of a convolution and the input pixels of a transposed one; 3x
that with the backward), so a padded variant is only faster if its time is lower. The two
3x3 variants apply to 3x3 stride-1 layers only.
Medians over --repeats calls after a warm-up. Not a test.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from common import ARTICLE_CONV3, call_seconds, device_info, median, report  # noqa: E402
from ddpm_jax import runtime  # noqa: E402

flags.DEFINE_integer("batch", 128, "Batch size (the article trains at 128).")
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement (median).")
flags.DEFINE_integer("threads", 2, "PyTorch's intra-op threads.")
flags.DEFINE_string("json", "", "Also write the result to this file.")
FLAGS = flags.FLAGS

# The other convolutions, as flax.linen runs them: (name, size in, in, out, kernel, stride, PyTorch's
# padding, transposed). ConvTranspose2d(k, s, p) is lax.conv_transpose with padding k - 1 - p.
ARTICLE_OTHER = [
    ("down1", 28, 10, 10, 4, 2, 1, False), ("down2", 14, 20, 20, 4, 2, 1, False),
    ("down3_a", 7, 40, 40, 2, 1, 0, False), ("down3_b", 6, 40, 40, 4, 2, 1, False),
    ("up1_a", 3, 40, 40, 4, 2, 1, True), ("up1_b", 6, 40, 40, 2, 1, 0, True),
    ("up2", 7, 20, 20, 4, 2, 1, True), ("up3", 14, 10, 10, 4, 2, 1, True),
]
DIMS = ("NHWC", "HWIO", "NHWC")


def layer_fn(kernel: int, stride: int, padding: int, transposed: bool):
    """The layer's function (x, w) -> y, as flax.linen.Conv / ConvTranspose(transpose_kernel) run it."""
    if transposed:
        pad = [(kernel - 1 - padding,) * 2] * 2
        return lambda x, w: jax.lax.conv_transpose(x, w, (stride, stride), pad, dimension_numbers=DIMS,
                                                   transpose_kernel=True)
    return lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                                     dimension_numbers=DIMS)


conv = layer_fn(3, 1, 1, False)  # the 3x3 stride-1 layer the two variants reformulate


def round_up(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


def conv_pad16(x, w):
    """conv(x, w) computed on channels zero-padded to multiples of 16, then sliced back."""
    cin, cout = w.shape[2], w.shape[3]
    xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, round_up(cin) - cin)))
    wp = jnp.pad(w, ((0, 0), (0, 0), (0, round_up(cin) - cin), (0, round_up(cout) - cout)))
    return conv(xp, wp)[..., :cout]


def conv_transposed(x, w):
    """conv(x, w) as the input gradient of z -> conv(z, k), k = w flipped in space, in/out swapped."""
    k = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    z = jnp.zeros(x.shape[:3] + (w.shape[3],), x.dtype)
    return jax.vjp(lambda z: conv(z, k), z)[1](x)[0]


VARIANTS = {"xla_pad16": conv_pad16, "xla_transposed": conv_transposed}  # of 3x3 stride-1 layers


def model_layer_fn(kernel: int, stride: int, padding: int, transposed: bool):
    """The layer's function as ddpm_jax's article U-Net computes it (models/article_unet.py)."""
    from ddpm_jax.models.convs import fast_conv, stride_two_conv_transpose
    from ddpm_jax.models.cpu_kernels import conv as kernel_conv

    if transposed and stride == 2:
        return stride_two_conv_transpose
    if transposed:  # stride 1: the convolution with the kernel flipped, padded by k - 1 - p
        return lambda x, w: kernel_conv(x, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), kernel - 1 - padding)
    if stride == 2:
        return lambda x, w: fast_conv(x, w, (2, 2), [(padding, padding)] * 2, dimension_numbers=DIMS)
    return lambda x, w: kernel_conv(x, w, padding)


def median_seconds(call, repeats: int) -> float:
    """Median wall time of call() over `repeats` calls, after two untimed ones (compile, warm-up)."""
    return median(call_seconds(call, repeats, warmups=2))


def xla_times(form, size: int, cin: int, cout: int, kernel: int, batch: int, repeats: int) -> tuple[float, float]:
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (batch, size, size, cin))
    w = jax.random.normal(key_w, (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
    forward = jax.jit(form)
    # the backward of a training step: gradients of <y, g> for a fixed cotangent g
    g = jnp.ones(jax.eval_shape(form, x, w).shape)
    both = jax.jit(jax.grad(lambda x, w: jnp.vdot(form(x, w), g), argnums=(0, 1)))
    return (median_seconds(lambda: jax.block_until_ready(forward(x, w)), repeats),
            median_seconds(lambda: jax.block_until_ready(both(x, w)), repeats))


def torch_times(size: int, cin: int, cout: int, kernel: int, stride: int, padding: int, transposed: bool,
                batch: int, repeats: int) -> tuple[float, float]:
    import torch

    x = torch.randn(batch, cin, size, size, requires_grad=True)
    w = torch.randn(*((cin, cout) if transposed else (cout, cin)), kernel, kernel, requires_grad=True)
    layer = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    g = torch.ones_like(layer(x, w, stride=stride, padding=padding))

    def forward():
        with torch.no_grad():
            layer(x, w, stride=stride, padding=padding)

    def both():
        x.grad = w.grad = None
        layer(x, w, stride=stride, padding=padding).backward(g)

    return median_seconds(forward, repeats), median_seconds(both, repeats)


def main(_):
    runtime.configure(reexec=True)  # the CLIs' process settings (DDPM_JAX_CPU_TUNING=off: without them)
    try:
        import torch

        torch.set_num_threads(FLAGS.threads)
        forms = ["xla", *VARIANTS, "kernel", "torch"]
    except ImportError:
        forms = ["xla", *VARIANTS, "kernel"]
        print("torch is not installed: XLA formulations only", file=sys.stderr)

    layers = [(f"{size}x{size} {cin}->{cout}", count, size, cin, cout, 3, 1, 1, False)
              for (size, cin, cout), count in ARTICLE_CONV3.items()]
    layers += [(f"{name} {size}x{size} {cin}->{cout}", 1, size, cin, cout, k, st, p, tr)
               for name, size, cin, cout, k, st, p, tr in ARTICLE_OTHER]
    rows = []
    totals = {form: [0.0, 0.0] for form in forms}  # model-weighted seconds: forward, forward+backward
    print(f"{'layer':>26} {'count':>5}  " + "  ".join(f"{f:>22}" for f in forms))
    print(f"{'GFLOP/s':>26} {'':>5}  " + "  ".join(f"{'fwd / fwd+bwd':>22}" for _ in forms))
    for name, count, size, cin, cout, kernel, stride, padding, transposed in layers:
        pixels = size if transposed else (size + 2 * padding - kernel) // stride + 1
        flop = 2 * FLAGS.batch * pixels * pixels * kernel * kernel * cin * cout
        row = {"layer": name, "count": count, "kernel": kernel, "stride": stride, "transposed": transposed,
               "mflop_forward": flop / 1e6}
        cells = []
        for form in forms:
            if form in VARIANTS and not (kernel == 3 and stride == 1 and not transposed):
                # a 3x3 variant of another layer: the plain XLA time counts in the totals
                fwd, both = row["xla"]["forward_ms"] / 1e3, row["xla"]["forward_backward_ms"] / 1e3
                cells.append(f"{'(as xla)':>22}")
            else:
                if form == "torch":
                    fwd, both = torch_times(size, cin, cout, kernel, stride, padding, transposed, FLAGS.batch,
                                            FLAGS.repeats)
                else:
                    make = model_layer_fn if form == "kernel" else layer_fn
                    fn = VARIANTS.get(form) or make(kernel, stride, padding, transposed)
                    fwd, both = xla_times(fn, size, cin, cout, kernel, FLAGS.batch, FLAGS.repeats)
                row[form] = {"forward_ms": round(fwd * 1e3, 3), "forward_backward_ms": round(both * 1e3, 3),
                             "forward_gflops": round(flop / fwd / 1e9, 1),
                             "forward_backward_gflops": round(3 * flop / both / 1e9, 1)}
                cells.append(f"{row[form]['forward_gflops']:>10.1f} / {row[form]['forward_backward_gflops']:>9.1f}")
            totals[form][0] += count * fwd
            totals[form][1] += count * both
        rows.append(row)
        print(f"{name:>26} {count:>5}  " + "  ".join(cells), flush=True)
    summary = {form: {"model_forward_ms": round(t[0] * 1e3, 1), "model_forward_backward_ms": round(t[1] * 1e3, 1)}
               for form, t in totals.items()}
    print("all convolutions of the model, ms (forward / forward+backward): " + ", ".join(
        f"{form} {s['model_forward_ms']} / {s['model_forward_backward_ms']}" for form, s in summary.items()))
    report({"batch": FLAGS.batch, "rows": rows, "model_totals": summary, **device_info()}, FLAGS.json or None)


if __name__ == "__main__":
    app.run(main)
