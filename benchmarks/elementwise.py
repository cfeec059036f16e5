"""SiLU and LayerNorm alone: XLA's fusions against ddpm-jax's CPU kernels, by activation shape.

    python benchmarks/elementwise.py [--batch 128] [--rounds 9] [--json out.json]

Times jax.nn.silu and cpu_kernels.silu on the article U-Net's activation shapes (and the
same elements flat), a convolution's bias and SiLU (XLA's add and jax.nn.silu against
cpu_kernels.silu(x, bias)), and the article's LayerNorm over (H, W, C) forward and forward + backward,
XLA's (plain JAX) against cpu_kernels.layer_norm. Prints ms per million elements (the minimum
and the median over `--rounds` interleaved rounds). On the CPU only; the kernels need a C++
compiler (ddpm_jax/models/cpu_kernels.py).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ddpm_jax import runtime  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    runtime.configure(reexec=True)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from common import device_info, report
    from ddpm_jax.models import cpu_kernels

    if not cpu_kernels.available():
        sys.exit("error: the CPU kernels are not available here (see ddpm_jax/models/cpu_kernels.py)")
    rng = np.random.default_rng(0)
    cases = {}  # name -> (function, arguments, elements)
    for shape in ((28, 28, 10), (14, 14, 20), (7, 7, 40), (28 * 28 * 10,)):
        x = jnp.asarray(rng.normal(size=(args.batch, *shape)).astype(np.float32))
        label = "x".join(map(str, (args.batch, *shape)))
        cases[f"silu {label} xla"] = (jax.jit(jax.nn.silu), (x,), x.size)
        cases[f"silu {label} kernel"] = (jax.jit(cpu_kernels.silu), (x,), x.size)
        if len(shape) == 3:  # a convolution's bias and SiLU: XLA's add and SiLU, or one kernel
            bias = jnp.asarray(rng.normal(size=shape[-1:]).astype(np.float32))
            cases[f"silu(x + bias) {label} xla"] = (jax.jit(lambda x, b: jax.nn.silu(x + b)), (x, bias), x.size)
            cases[f"silu(x + bias) {label} kernel"] = (jax.jit(cpu_kernels.silu), (x, bias), x.size)
    x = jnp.asarray(rng.normal(size=(args.batch, 28, 28, 10)).astype(np.float32))
    scale, bias = jnp.ones((28, 28, 10)), jnp.zeros((28, 28, 10))
    xla_norm = lambda x, s, b: cpu_kernels._jax_layer_norm(x, s, b, 1e-5)[0]  # noqa: E731
    kernel_norm = lambda x, s, b: cpu_kernels.layer_norm(x, s, b, 1e-5)  # noqa: E731
    for name, norm in (("xla", xla_norm), ("kernel", kernel_norm)):
        loss = lambda x, s, b, norm=norm: jnp.sum(norm(x, s, b) * x)  # noqa: E731
        cases[f"layer_norm {args.batch}x28x28x10 forward {name}"] = (jax.jit(norm), (x, scale, bias), x.size)
        cases[f"layer_norm {args.batch}x28x28x10 forward+backward {name}"] = (
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (x, scale, bias), x.size)

    def ms_per_million(fn, arguments, elements, calls=10):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*arguments)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / calls * 1e3 / elements * 1e6

    for fn, arguments, _ in cases.values():
        jax.block_until_ready(fn(*arguments))  # compile
    times = {name: [] for name in cases}
    for _ in range(args.rounds):  # interleaved, so a noisy machine slows every case alike
        for name, case in cases.items():
            times[name].append(ms_per_million(*case))
    result = {"ms_per_million_elements": {name: {"min": round(min(t), 3), "median": round(statistics.median(t), 3)}
                                          for name, t in times.items()},
              "batch": args.batch, "rounds": args.rounds, "device": device_info()}
    report(result, args.json)


if __name__ == "__main__":
    main()
