"""Train a DDPM.

    python train.py --config configs/fashion.py --workdir runs/fashion
    python train.py --config configs/fashion.py --config.train.max_steps=200   # a quick demo

Rerunning the same command on the same workdir resumes from its latest checkpoint.
Any config field can be overridden with --config.<field>=<value>.
"""

import sys

from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli

config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/fashion.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go (default: runs/<dataset>).")
FLAGS = flags.FLAGS


def main():
    if FLAGS.config is None:
        cli.fail("no config given; pass --config configs/fashion.py (or configs/mnist.py)")
    from ddpm_jax.run import train_and_evaluate  # imported late so that --help is fast

    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir or f"runs/{FLAGS.config.data.name}")
    print(f"Checkpoints in {summary['workdir']}/checkpoints; sample with: python sample.py --ckpt {summary['workdir']}")
    if summary["stop_reason"] == "interrupted":
        sys.exit(130)  # saved cleanly, but a script chaining on this run should not go on


if __name__ == "__main__":
    cli.run(main)
