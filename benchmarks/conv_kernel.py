"""The CPU convolution kernel's forward and kernel gradient alone, per 3x3 layer of the article's U-Net.

    python benchmarks/conv_kernel.py [--batch 128] [--repeats 30] [--json out.json]

For every distinct (size, in, out) of the model's 3x3 stride-1, padding-1 convolutions, the time of
one call of ddpm_jax/models/cpu_kernels.cc's `Conv` (the forward; the input gradient is the same
kernel on other shapes) and of its `ConvKernelGrad` on random data, the minimum of --repeats
calls after a warm-up (a kernel change shows in the minimum; the median carries the machine's
noise), and both summed over the model's layers. benchmarks/conv_layers.py sets them beside XLA
and PyTorch. Needs the compiled kernels (a C++ compiler). Not a test.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from common import ARTICLE_CONV3, call_seconds, device_info, report  # noqa: E402
from ddpm_jax import runtime  # noqa: E402
from ddpm_jax.models import cpu_kernels  # noqa: E402

flags.DEFINE_integer("batch", 128, "Batch size (the article trains at 128).")
flags.DEFINE_integer("repeats", 30, "Timed calls per measurement (minimum).")
flags.DEFINE_string("json", "", "Also write the result to this file.")
FLAGS = flags.FLAGS


def min_ms(fn, *args) -> float:
    return 1e3 * min(call_seconds(lambda: jax.block_until_ready(fn(*args)), FLAGS.repeats))


def main(argv):
    del argv
    runtime.configure(reexec=True)  # the CLIs' process settings (DDPM_JAX_CPU_TUNING=off: without them)
    if not cpu_kernels.available():
        sys.exit("conv_kernel.py: the CPU kernels are not built here (no C++ compiler, or DDPM_JAX_CPU_KERNELS=off)")
    rng = np.random.default_rng(0)
    forward = jax.jit(lambda x, w: cpu_kernels._kernel_conv(x, w, 1))
    kernel_grad = jax.jit(lambda x, dy: cpu_kernels._kernel_conv_kernel_grad(x, dy, 3, 1))
    layers, totals = [], {"forward_ms": 0.0, "kernel_grad_ms": 0.0}
    for (size, cin, cout), count in ARTICLE_CONV3.items():
        x = jnp.asarray(rng.normal(size=(FLAGS.batch, size, size, cin)).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)).astype(np.float32))
        dy = jnp.asarray(rng.normal(size=(FLAGS.batch, size, size, cout)).astype(np.float32))
        row = {"size": size, "in": cin, "out": cout, "count": count,
               "forward_ms": round(min_ms(forward, x, w), 3), "kernel_grad_ms": round(min_ms(kernel_grad, x, dy), 3)}
        for key in totals:
            totals[key] += count * row[key]
        layers.append(row)
        print(f"{size:2d}x{size:<2d} {cin:2d} -> {cout:2d} (x{count}): forward {row['forward_ms']:.3f} ms, "
              f"kernel gradient {row['kernel_grad_ms']:.3f} ms", flush=True)
    report({"batch": FLAGS.batch, "repeats": FLAGS.repeats, "layers": layers,
            "model_total": {key: round(value, 2) for key, value in totals.items()}, **device_info()}, FLAGS.json or None)


if __name__ == "__main__":
    app.run(main)
