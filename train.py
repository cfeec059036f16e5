"""Train a DDPM.

    python train.py --config configs/fashion.py --workdir runs/fashion
    python train.py --config configs/fashion.py --config.train.max_steps=200   # a quick demo

Rerunning the same command on the same workdir resumes from its latest checkpoint.
Any config field can be overridden with --config.<field>=<value>. Flags use underscores
(--config.train.batch_size, --workdir). The default workdir is runs/<config file name>.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli

config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/fashion.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go "
                    "(default: runs/<config file name>, e.g. runs/fashion_unet).")
FLAGS = flags.FLAGS


def main():
    if FLAGS.config is None:
        cli.fail("no config given; pass --config configs/fashion.py (or configs/mnist.py)")
    from ddpm_jax.run import train_and_evaluate  # imported late so that --help is fast

    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir or default_workdir(config_flags.get_config_filename(
        FLAGS["config"])))
    print(f"Checkpoints in {summary['workdir']}/checkpoints; sample with: python sample.py --ckpt {summary['workdir']}")
    if summary["stop_reason"] == "interrupted":
        # Saved cleanly, but a script chaining on this run should not go on: 128 + the signal (130 for Ctrl-C).
        sys.exit(128 + summary["signal"])


def default_workdir(config_path: str) -> str:
    """runs/<config file stem>: configs/fashion_unet.py -> runs/fashion_unet (one folder per config)."""
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


if __name__ == "__main__":
    cli.run(main)
