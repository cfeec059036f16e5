"""Evaluate generated images: FID, KID and class entropy on a small classifier's features, and bits/dim.

    python evaluate.py --train_classifier --dataset fashion_mnist --manual_dir DIR   # once per dataset
    python evaluate.py --train_classifier --dataset cifar10                          # any labelled tfds dataset
    python evaluate.py --samples samples.npz --dataset fashion_mnist                 # any generator's samples
    python evaluate.py --ckpt runs/fashion --num 10000 --bpd_images 1000             # sample, evaluate, bits/dim

Flags are spelled with underscores (--bpd_images, --manual_dir, --save_samples, ...).
Samples are uint8 NHWC under key arr_0 (sample.py --out). Every figure has a real-data
reference beside it (as many training images as samples, against the same test split).
The JSON goes to stdout (notes to stderr); --json PATH writes it too. An interrupted --ckpt
run keeps its finished samples in <--save_samples or --json path>.partial.npz, and the same
command resumes from them. The classifier is trained once per dataset with --train_classifier
(never implicitly), sized for the dataset's images (classifier.classifier_config_for: a small CNN
for 28x28 grayscale, a wider one for 32x32 RGB), and cached under
~/.cache/ddpm_jax/classifiers/<dataset>/ (--cache_dir or $DDPM_JAX_CACHE move it). The library
side: ddpm_jax/evaluation.py.
"""

import json

from absl import flags

from ddpm_jax import cli

flags.DEFINE_string("samples", None, "An .npz of generated images: uint8 (N, H, W, C) under key arr_0.")
flags.DEFINE_string("ckpt", None, "A train.py workdir, its checkpoints/ folder or one step folder: sample from it "
                                  "and evaluate.")
flags.DEFINE_bool("train_classifier", False, "Train the dataset's classifier and store it in the cache.")
flags.DEFINE_string("dataset", None, "A labelled tfds image dataset: fashion_mnist, mnist, cifar10, ... (with "
                                     "--ckpt: the checkpoint's, by default).")
flags.DEFINE_string("data_dir", "", "tfds data_dir ('' = tfds' default; with --ckpt: the checkpoint config's).")
flags.DEFINE_string("manual_dir", "", "Folder with the official .gz archives, for machines without internet "
                                      "(with --ckpt: the checkpoint config's by default).")
flags.DEFINE_string("cache_dir", "", "Cache root holding classifiers/<dataset>/ (default $DDPM_JAX_CACHE or "
                                     "~/.cache/ddpm_jax).")
flags.DEFINE_string("json", "", "Also write the result JSON to this file.")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs (--json, --save_samples, a stored classifier).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
# --ckpt
flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint of a workdir.")
flags.DEFINE_enum("weights", "auto", ["auto", "ema", "raw"], "EMA or raw weights (auto: EMA when the checkpoint "
                                                             "has them).")
flags.DEFINE_integer("num", 10000, "Samples to generate with --ckpt (0: only bits/dim).", lower_bound=0)
cli.define_sample_flags(also=", for sampling and for bits/dim")
flags.DEFINE_enum("labels", "auto", ["auto", "balanced", "none"], "Conditional models: sample i gets class i mod K "
                                                                  "(auto/balanced) or no label (none).")
flags.DEFINE_integer("seed", 0, "Seed of the samples and of the bits/dim noise; with --train_classifier, of the "
                                "classifier.")
flags.DEFINE_integer("batch", 256, "Images per batch for sampling and bits/dim.", lower_bound=1)
flags.DEFINE_integer("bpd_images", 1000, "Test images for bits/dim with --ckpt (0: skip). Costs T model "
                                         "evaluations per image.", lower_bound=0)
flags.DEFINE_string("save_samples", "", "With --ckpt: also save the samples (.npz, uint8, key arr_0).")
# metrics
flags.DEFINE_integer("kid_subsets", 100, "KID: number of random subsets.", lower_bound=1)
flags.DEFINE_integer("kid_subset_size", 1000, "KID: rows per subset (capped at the smaller set).", lower_bound=2)
# classifier training: change only for tests and experiments (classifier.json records them)
flags.DEFINE_integer("classifier_epochs", None, "Classifier epochs (default: the library's).", lower_bound=1)
flags.DEFINE_list("classifier_channels", None, "Classifier conv widths (default: for the image shape, 32,64 "
                                               "for 28x28 grayscale, 64,128,256 for 32x32 RGB).")
flags.DEFINE_integer("classifier_features", None, "Classifier feature width (default: 128 for 28x28 grayscale, "
                                                  "else 256).", lower_bound=1)
flags.DEFINE_integer("classifier_train_images", 0, "Train the classifier on the first N images (0 = all).",
                     lower_bound=0)
FLAGS = flags.FLAGS


def main():
    modes = [name for name, on in (("--samples", FLAGS.samples), ("--ckpt", FLAGS.ckpt),
                                   ("--train_classifier", FLAGS.train_classifier)) if on]
    if len(modes) != 1:
        cli.fail("give exactly one of --samples FILE, --ckpt PATH or --train_classifier"
                 + (f" (got {' and '.join(modes)})" if modes else ""))
    save_samples = FLAGS.save_samples if FLAGS.ckpt else ""
    for path in (p for p in (FLAGS.json, save_samples) if p):
        cli.check_output(path, FLAGS.overwrite)
    if save_samples and not save_samples.endswith(".npz"):
        cli.fail(f"--save_samples {save_samples}: the name must end in .npz")

    from ddpm_jax import evaluation

    data = dict(data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir, cache_dir=FLAGS.cache_dir,
                progress=FLAGS.progress)
    metrics = dict(kid_subsets=FLAGS.kid_subsets, kid_subset_size=FLAGS.kid_subset_size)
    if FLAGS.train_classifier:
        if not FLAGS.dataset:
            cli.fail("--train_classifier needs --dataset (e.g. fashion_mnist, mnist or cifar10)")
        channels = tuple(int(c) for c in FLAGS.classifier_channels) if FLAGS.classifier_channels else None
        result = evaluation.train_and_store_classifier(
            FLAGS.dataset, overwrite=FLAGS.overwrite, channels=channels, features=FLAGS.classifier_features,
            epochs=FLAGS.classifier_epochs, seed=FLAGS.seed, train_images=FLAGS.classifier_train_images, **data)
    elif FLAGS.samples:
        result = evaluation.evaluate_samples_file(FLAGS.samples, FLAGS.dataset, **data, **metrics)
    else:
        result = evaluation.evaluate_checkpoint(
            FLAGS.ckpt, which=FLAGS.which, weights=FLAGS.weights, num=FLAGS.num, seed=FLAGS.seed, labels=FLAGS.labels,
            batch_size=FLAGS.batch, bpd_images=FLAGS.bpd_images, dataset=FLAGS.dataset, save_samples=save_samples,
            resume_file=f"{save_samples or FLAGS.json}.partial.npz" if save_samples or FLAGS.json else "",
            **cli.sample_overrides(), **data, **metrics)
    print(json.dumps(result, indent=2))
    if FLAGS.json:
        try:
            evaluation.save_json(FLAGS.json, result)
        except OSError as e:
            cli.fail(f"could not write {FLAGS.json}: {e.strerror or e}")
        evaluation.note(f"Wrote {FLAGS.json}")


if __name__ == "__main__":
    cli.run(main)
