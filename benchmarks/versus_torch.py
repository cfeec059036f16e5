"""ddpm-jax against the article's PyTorch code on the same work, side by side in one sitting.

    pip install torch==2.13.0     # optional, CPU build
    python benchmarks/versus_torch.py [--what train,sample] [--rounds 3] [--threads 2] [--without_kernels] [--json out.json]

Runs train_throughput.py / sample_throughput.py (configs/fashion.py: the article's U-Net, batch 128;
100 images x 1000 ancestral steps) and torch_article.py's same work, alternating ours and theirs
`--rounds` times each in fresh processes, so that a noisy shared machine slows both alike. Prints
each run's images/s, the medians and the ratio of the medians (> 1: ddpm-jax is faster).
`--without_kernels` also runs ddpm-jax with DDPM_JAX_CPU_KERNELS=off in each round (XLA's own SiLU
and LayerNorm instead of ddpm_jax/models/cpu_kernels.cc), for the kernels' share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(what: str, threads: int) -> tuple[list[str], list[str]]:
    """(ours, theirs): the two command lines for `what` ('train' or 'sample')."""
    py = sys.executable
    if what == "train":
        return ([py, "benchmarks/train_throughput.py", "--config", "configs/fashion.py"],
                [py, "benchmarks/torch_article.py", "train", "--threads", str(threads)])
    return ([py, "benchmarks/sample_throughput.py", "--config", "configs/fashion.py", "--num", "100"],
            [py, "benchmarks/torch_article.py", "sample", "--num", "100", "--threads", str(threads)])


def images_per_s(cmd: list[str], env: dict | None = None) -> float:
    """Runs a benchmark command (with `env` added to the environment) and returns the images/s it reports."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        done = subprocess.run([*cmd, "--json", path], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})})
        if done.returncode:
            sys.exit(f"error: {' '.join(cmd[1:])} failed: {done.stderr.strip().splitlines()[-1:]}")
        with open(path) as f:
            return float(json.load(f)["images_per_s"])


def compare(what: str, rounds: int, threads: int, without_kernels: bool = False) -> dict:
    ours_cmd, theirs_cmd = commands(what, threads)
    ours, plain, theirs = [], [], []
    for i in range(rounds):
        ours.append(images_per_s(ours_cmd))
        if without_kernels:
            plain.append(images_per_s(ours_cmd, {"DDPM_JAX_CPU_KERNELS": "off"}))
        theirs.append(images_per_s(theirs_cmd))
        print(f"{what} round {i + 1}/{rounds}: ddpm-jax {ours[-1]:.4g} images/s, "
              + (f"without its CPU kernels {plain[-1]:.4g}, " if without_kernels else "")
              + f"PyTorch {theirs[-1]:.4g} images/s", flush=True)
    result = {"what": what, "ddpm_jax_images_per_s": ours, "torch_images_per_s": theirs,
              "ddpm_jax_median": statistics.median(ours), "torch_median": statistics.median(theirs)}
    result["ratio"] = round(result["ddpm_jax_median"] / result["torch_median"], 3)
    if without_kernels:
        result["without_kernels_images_per_s"] = plain
        result["without_kernels_median"] = statistics.median(plain)
        result["without_kernels_ratio"] = round(result["without_kernels_median"] / result["torch_median"], 3)
    print(f"{what}: median ddpm-jax {result['ddpm_jax_median']:.4g} / PyTorch {result['torch_median']:.4g} images/s "
          f"= {result['ratio']:.2f}x"
          + (f" (without its CPU kernels {result['without_kernels_median']:.4g} = {result['without_kernels_ratio']:.2f}x)"
             if without_kernels else ""), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="train,sample", help="comma-separated: train, sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores)")
    parser.add_argument("--without_kernels", action="store_true",
                        help="also run ddpm-jax with DDPM_JAX_CPU_KERNELS=off in each round")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    kinds = [w.strip() for w in args.what.split(",") if w.strip()]
    if not kinds or any(w not in ("train", "sample") for w in kinds) or args.rounds < 1:
        parser.error("--what takes train and/or sample, --rounds >= 1")
    results = [compare(w, args.rounds, args.threads, args.without_kernels) for w in kinds]
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
