"""Generate images from a trained DDPM.

    python sample.py --ckpt runs/fashion                      # 100 samples -> samples.npz + samples.png
    python sample.py --ckpt runs/fashion --gif sampling.gif   # and the GIF of the reverse process
    python sample.py --ckpt runs/fashion_fast --sampler dpmpp_2m --steps 20   # 20 network evaluations
    python sample.py --ckpt runs/fashion_cond --label sneaker --guidance 2   # a conditional model's class

--ckpt takes a workdir, its checkpoints/ folder, or one checkpoints/<step> folder;
the checkpoint carries its config, so nothing else is needed. Flags are spelled with
underscores, absl style (--clip_x0, --noprogress), never with dashes.

Pictures enlarge each image with nearest neighbour to at least 112 px (--scale 1: the
images' own size). Outputs are written to a temporary file and renamed, so an interrupted
write never leaves a truncated file. A long run keeps its finished batches in
<output>.partial.npz: rerunning the same command after Ctrl-C (or a crash) resumes from
them and gives the same files as an uninterrupted run; the partial file is removed at the end.
"""

import sys

from absl import flags

from ddpm_jax import cli

flags.DEFINE_string("ckpt", None, "A workdir, its checkpoints/ folder, or one checkpoints/<step> folder.")
flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint of a workdir: best epoch loss or latest.")
flags.DEFINE_integer("num", 100, "Number of samples.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same samples.")
flags.DEFINE_enum("weights", "auto", ["auto", "ema", "raw"],
                  "Which parameters: the EMA (ema), the trained ones (raw), or the EMA when the run kept one (auto).")
cli.define_sample_flags()
flags.DEFINE_string("label", None, "Conditional models: the class to draw, by index or name ('7', 'sneaker'), "
                    "or 'none' for unconditional samples; default: one row per class.")
flags.DEFINE_string("out", "samples.npz", "Samples as uint8 NHWC under key arr_0, pixels as --display ('' to skip).")
flags.DEFINE_string("grid", "samples.png", "A PNG grid of the samples ('' to skip).")
flags.DEFINE_enum("display", "clip", ["clip", "minmax"],
                  "Pixels of the grid and --out: clip to [-1, 1] (honest), or min-max normalise each image "
                  "(the article's figures).")
flags.DEFINE_string("gif", "", "A GIF of the reverse process of the first 100 samples ('' to skip).")
flags.DEFINE_integer("frames", 100, "Frames recorded for the GIF.", lower_bound=1)
flags.DEFINE_integer("scale", None, "Enlarge each image in the grid and the GIF this many times (nearest "
                     "neighbour); default: to at least 112 px (4 for 28x28; a GIF stays within 480 px); "
                     "1 = the images' own size.", lower_bound=1)
flags.DEFINE_integer("batch", 256, "Samples per batch (bounds memory; does not change the samples).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace output files that already exist.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS

GIF_SAMPLES = 100


def main():
    if not FLAGS.ckpt:
        cli.fail("no checkpoint given; pass --ckpt with a workdir of train.py")
    # np.savez appends .npz to a name without it: write the name it always wrote.
    out = FLAGS.out if not FLAGS.out or FLAGS.out.endswith(".npz") else FLAGS.out + ".npz"
    outputs = [p for p in (out, FLAGS.grid, FLAGS.gif) if p]
    if not outputs:
        cli.fail("nothing to write; give --out, --grid or --gif")
    for path in outputs:
        cli.check_output(path, FLAGS.overwrite)
    partial_path = outputs[0] + ".partial.npz"

    import jax
    import numpy as np

    from ddpm_jax import viz
    from ddpm_jax.generate import PartialSamples, generate, load_trained, run_settings, sample_options, save_npz
    from ddpm_jax.parallel import make_mesh

    trained = load_trained(FLAGS.ckpt, FLAGS.which, FLAGS.weights)
    labels, cols = _labels(trained)
    options = sample_options(trained.config, **cli.sample_overrides())
    mesh = make_mesh()  # every local device takes a slice of each batch
    steps = options.steps or trained.schedule.n_steps
    num_frames = min(FLAGS.frames, steps) if FLAGS.gif else 0
    gif_end = min(FLAGS.num, GIF_SAMPLES) if FLAGS.gif else 0
    settings = run_settings(trained, options, seed=FLAGS.seed, num=FLAGS.num, labels=labels, num_frames=num_frames)
    partial = PartialSamples(partial_path, settings, FLAGS.num)
    print(f"Sampling {FLAGS.num} images from {trained.meta['checkpoint_dir']} ({trained.weights} weights, "
          f"{options.sampler}, {steps} steps) on {mesh.size} {jax.devices()[0].platform} device(s)")
    if partial.done:
        print(f"Resuming from {partial_path}: {partial.done} of {FLAGS.num} samples already drawn")

    def draw(end, start, frames):
        """Samples start .. end - 1 (with the trajectories when frames); each batch kept in the partial file."""
        return generate(trained, num=end, seed=FLAGS.seed, labels=None if labels is None else labels[:end],
                        batch_size=FLAGS.batch, num_frames=num_frames if frames else 0, frames_for=gif_end,
                        progress=FLAGS.progress, mesh=mesh, options=options, start=start, on_batch=partial.keep)

    try:
        # The GIF's samples first: their trajectories come back only when their call ends, so
        # they are drawn (again, if an interrupted run lacks them) before the rest.
        if partial.frames_done < gif_end:
            _, frames = draw(gif_end, partial.frames_done, frames=True)
            partial.keep_frames(np.stack([viz.to_uint8(f, "minmax") for f in frames]))
        if partial.done < FLAGS.num:
            draw(FLAGS.num, partial.done, frames=False)
    except KeyboardInterrupt:
        if partial.done:
            print(f"{partial.done} of {FLAGS.num} samples kept in {partial_path}; rerun the same command to resume",
                  file=sys.stderr)
        raise
    x0, frames = partial.x0, partial.frames
    try:
        if out:
            save_npz(out, arr_0=viz.to_uint8(x0, FLAGS.display))
            print(f"Wrote {out} ({FLAGS.num} images, uint8 NHWC, key arr_0)")
        if FLAGS.grid:
            viz.save_grid(FLAGS.grid, x0, display=FLAGS.display, cols=cols, scale=FLAGS.scale)
            print(f"Wrote {FLAGS.grid}")
        if FLAGS.gif:
            viz.save_gif(FLAGS.gif, frames, scale=FLAGS.scale)  # uint8, already min-max normalised per image
            print(f"Wrote {FLAGS.gif} ({frames.shape[0]} frames of {frames.shape[1]} samples)")
    except OSError as e:
        cli.fail(f"could not write {e.filename or 'an output'}: {e.strerror or e}; choose another output path")
    partial.remove()


def _labels(trained):
    """(labels or None, grid columns or None) that --label asks of this model."""
    from ddpm_jax.data import label_index
    from ddpm_jax.generate import class_rows

    if not trained.num_classes:
        if FLAGS.label not in (None, "none"):
            cli.fail("--label needs a class-conditional model; this one is unconditional")
        return None, None
    if FLAGS.label == "none":
        return None, None
    if FLAGS.label is None:
        return class_rows(FLAGS.num, trained.num_classes)
    d = trained.config.data
    return [label_index(FLAGS.label, d.name, d.path, data_dir=d.data_dir)] * FLAGS.num, None


if __name__ == "__main__":
    cli.run(main)
