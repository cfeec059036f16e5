"""Generate images from a trained DDPM.

    python sample.py --ckpt runs/fashion                      # 100 samples -> samples.npz + samples.png
    python sample.py --ckpt runs/fashion --gif sampling.gif   # and the GIF of the reverse process

--ckpt takes a workdir, its checkpoints/ folder, or one checkpoints/<step> folder;
the checkpoint carries its config, so nothing else is needed.
"""

import os

from absl import flags

from ddpm_jax import cli

flags.DEFINE_string("ckpt", None, "A workdir, its checkpoints/ folder, or one checkpoints/<step> folder.")
flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint of a workdir: best epoch loss or latest.")
flags.DEFINE_integer("num", 100, "Number of samples.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same samples.")
flags.DEFINE_enum("sigma", None, ["beta", "beta_tilde"], "Reverse-process variance (default: the checkpoint config's).")
flags.DEFINE_string("out", "samples.npz", "Samples as uint8 NHWC under key arr_0 ('' to skip).")
flags.DEFINE_string("grid", "samples.png", "A PNG grid of the samples ('' to skip).")
flags.DEFINE_enum("display", "clip", ["clip", "minmax"],
                  "Grid pixels: clip to [-1, 1] (honest), or min-max normalise each image (the article's figures).")
flags.DEFINE_string("gif", "", "A GIF of the reverse process of the first 100 samples ('' to skip).")
flags.DEFINE_integer("frames", 100, "Frames recorded for the GIF.", lower_bound=1)
flags.DEFINE_integer("batch", 256, "Samples per batch (bounds memory; does not change the samples).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace output files that already exist.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS

GIF_SAMPLES = 100


def _check_output(path: str) -> None:
    """Fails before any work if `path` exists (without --overwrite) or cannot be created."""
    if os.path.exists(path) and not FLAGS.overwrite:
        cli.fail(f"{path} exists; choose another name or pass --overwrite")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the nearest existing ancestor must be a writable folder
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        cli.fail(f"cannot create {path}: {folder} is not a folder you can write; choose another output path")


def main():
    if not FLAGS.ckpt:
        cli.fail("no checkpoint given; pass --ckpt with a workdir of train.py")
    # np.savez appends .npz to a name without it: check the name it will really write.
    out = FLAGS.out if not FLAGS.out or FLAGS.out.endswith(".npz") else FLAGS.out + ".npz"
    outputs = [p for p in (out, FLAGS.grid, FLAGS.gif) if p]
    if not outputs:
        cli.fail("nothing to write; give --out, --grid or --gif")
    for path in outputs:
        _check_output(path)

    import jax
    import numpy as np

    from ddpm_jax import viz
    from ddpm_jax.checkpoint import load_checkpoint
    from ddpm_jax.data import from_model_range
    from ddpm_jax.models import create_model
    from ddpm_jax.parallel import batch_sharding, make_mesh, replicated
    from ddpm_jax.sampling import sample_batched
    from ddpm_jax.schedule import make_schedule

    config, params, meta = load_checkpoint(FLAGS.ckpt, FLAGS.which)
    mesh = make_mesh()  # every local device takes a slice of each batch
    params = jax.device_put(params, replicated(mesh))
    image_shape = tuple(meta["image_shape"])
    model = create_model(config, image_shape)
    schedule = make_schedule(config.diffusion)
    sigma = FLAGS.sigma or config.sample.sigma
    print(f"Sampling {FLAGS.num} images from {meta['checkpoint_dir']} (sigma^2 = {sigma}, "
          f"{schedule.n_steps} steps) on {mesh.size} {jax.devices()[0].platform} device(s)")
    x0, frames = sample_batched(model.apply, {"params": params}, schedule, jax.random.key(FLAGS.seed), FLAGS.num,
                                image_shape, batch_size=FLAGS.batch, sigma=sigma,
                                num_frames=FLAGS.frames if FLAGS.gif else 0, frames_for=GIF_SAMPLES,
                                progress=FLAGS.progress, batch_sharding=batch_sharding(mesh) if mesh.size > 1 else None)
    try:
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            np.savez(out, arr_0=from_model_range(x0, clip=True))
            print(f"Wrote {out} ({FLAGS.num} images, uint8 NHWC, key arr_0)")
        if FLAGS.grid:
            viz.save_grid(FLAGS.grid, x0, display=FLAGS.display)
            print(f"Wrote {FLAGS.grid}")
        if FLAGS.gif:
            viz.save_gif(FLAGS.gif, frames)
            print(f"Wrote {FLAGS.gif} ({frames.shape[0]} frames of {frames.shape[1]} samples)")
    except OSError as e:
        cli.fail(f"could not write {e.filename or 'an output'}: {e.strerror or e}; choose another output path")


if __name__ == "__main__":
    cli.run(main)
