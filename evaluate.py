"""Evaluate generated images: FID, KID and class entropy on a small classifier's features, and bits/dim.

    python evaluate.py --train-classifier --dataset fashion_mnist --manual-dir DIR   # once per dataset
    python evaluate.py --samples samples.npz --dataset fashion_mnist                 # any generator's samples
    python evaluate.py --ckpt runs/fashion --num 10000 --bpd-images 1000             # sample, evaluate, bits/dim

Samples are uint8 NHWC under key arr_0 (sample.py --out). Every figure has a real-data
reference beside it: as many training images as there are samples, against the same test
split, so a number can be read. The JSON goes to stdout (progress and notes to stderr);
--json PATH writes it too. FID/KID use the classifier's 128-d penultimate features; the
class entropy is in nats (at most ln 10 = 2.303). Bits/dim is the negative variational
bound of the first --bpd-images test images (Ho et al. 2020, eq. 5 and 13).

The classifier is trained once per dataset, explicitly, with --train-classifier (never
implicitly), and stored under ~/.cache/ddpm_jax/classifiers/<dataset>/ (the root moves
with --cache-dir or $DDPM_JAX_CACHE).
"""

import functools
import json
import math
import os
import sys

from absl import flags

from ddpm_jax import cli

flags.DEFINE_string("samples", None, "An .npz of generated images: uint8 (N, H, W, C) under key arr_0.")
flags.DEFINE_string("ckpt", None, "A train.py workdir, its checkpoints/ folder or one step folder: sample from it "
                                  "and evaluate.")
flags.DEFINE_bool("train-classifier", False, "Train the dataset's classifier and store it in the cache.")
flags.DEFINE_string("dataset", None, "fashion_mnist or mnist (with --ckpt: the checkpoint's, by default).")
flags.DEFINE_string("data-dir", "", "tfds data_dir ('' = tfds' default; with --ckpt: the checkpoint config's).")
flags.DEFINE_string("manual-dir", "", "Folder with the official .gz archives, for machines without internet "
                                      "(with --ckpt: the checkpoint config's by default).")
flags.DEFINE_string("cache-dir", "", "Cache root holding classifiers/<dataset>/ (default $DDPM_JAX_CACHE or "
                                     "~/.cache/ddpm_jax).")
flags.DEFINE_string("json", "", "Also write the result JSON to this file.")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs (--json, --save-samples, a stored classifier).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
# --ckpt
flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint of a workdir.")
flags.DEFINE_enum("weights", "auto", ["auto", "ema", "raw"], "EMA or raw weights (auto: EMA when the checkpoint "
                                                             "has them).")
flags.DEFINE_integer("num", 10000, "Samples to generate with --ckpt (0: only bits/dim).", lower_bound=0)
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Sampler (default: the checkpoint config's).")
flags.DEFINE_integer("steps", None, "Reverse steps (default: the checkpoint config's).", lower_bound=1)
flags.DEFINE_float("eta", None, "DDIM eta (default: the checkpoint config's).")
flags.DEFINE_enum("sigma", None, ["beta", "beta_tilde"], "Reverse variance, for sampling and bits/dim (default: "
                                                         "the checkpoint config's).")
flags.DEFINE_float("guidance", None, "Conditional models: classifier-free guidance weight (default: the config's).")
flags.DEFINE_enum("labels", "auto", ["auto", "balanced", "none"], "Conditional models: sample i gets class i mod K "
                                                                  "(auto/balanced) or no label (none).")
flags.DEFINE_integer("seed", 0, "Seed of the samples and of the bits/dim noise; with --train-classifier, of the "
                                "classifier.")
flags.DEFINE_integer("batch", 256, "Images per batch for sampling and bits/dim.", lower_bound=1)
flags.DEFINE_integer("bpd-images", 1000, "Test images for bits/dim with --ckpt (0: skip). Costs T model "
                                         "evaluations per image.", lower_bound=0)
flags.DEFINE_string("save-samples", "", "With --ckpt: also save the samples (.npz, uint8, key arr_0).")
# metrics
flags.DEFINE_integer("kid-subsets", 100, "KID: number of random subsets.", lower_bound=1)
flags.DEFINE_integer("kid-subset-size", 1000, "KID: rows per subset (capped at the smaller set).", lower_bound=2)
# classifier training: change only for tests and experiments (classifier.json records them)
flags.DEFINE_integer("classifier-epochs", None, "Classifier epochs (default: the library's).", lower_bound=1)
flags.DEFINE_list("classifier-channels", None, "Classifier conv widths (default: 32,64).")
flags.DEFINE_integer("classifier-features", None, "Classifier feature width (default: 128).", lower_bound=1)
flags.DEFINE_integer("classifier-train-images", 0, "Train the classifier on the first N images (0 = all).",
                     lower_bound=0)
FLAGS = flags.FLAGS

DATASETS = ("fashion_mnist", "mnist")


def flag(name):
    return FLAGS[name].value


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_dataset(name):
    if name not in DATASETS:
        cli.fail(f"unknown dataset {name!r}: use {' or '.join(DATASETS)}")


def _train_hint(dataset: str) -> str:
    cache = f" --cache-dir {flag('cache-dir')}" if flag("cache-dir") else ""
    return f"python evaluate.py --train-classifier --dataset {dataset} --manual-dir DIR{cache}"


def _stored_classifier_info(dataset: str) -> tuple[str, dict]:
    """(folder, classifier.json) of the dataset's classifier; one line saying how to train it when missing."""
    from ddpm_jax.evaluation import classifier_dir, has_classifier, read_classifier_info

    folder = classifier_dir(dataset, flag("cache-dir"))
    if not has_classifier(folder):
        cli.fail(f"no {dataset} classifier in {folder}; train it once (a few minutes on a CPU) with: "
                 f"{_train_hint(dataset)}")
    info = read_classifier_info(folder)
    if info.get("dataset") != dataset:
        cli.fail(f"the classifier in {folder} was trained on {info.get('dataset')!r}, not {dataset!r}; "
                 f"retrain it with {_train_hint(dataset)} --overwrite")
    return folder, info


def _read_samples(path: str) -> "np.ndarray":  # noqa: F821
    """The uint8 (N, H, W, C) images under arr_0 of an .npz, N >= 2; one line and exit 2 otherwise."""
    import numpy as np

    if not os.path.isfile(path):
        cli.fail(f"--samples {path} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "arr_0" not in archive.files:
                cli.fail(f"{path} holds no arr_0 (keys: {', '.join(archive.files) or 'none'}); save the images as "
                         "np.savez(path, arr_0=images)")
            images = archive["arr_0"]
    except (OSError, ValueError) as e:
        cli.fail(f"cannot read {path} as .npz: {' '.join(str(e).split())}")
    if images.dtype != np.uint8 or images.ndim != 4:
        cli.fail(f"{path}: arr_0 must be uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if images.shape[0] < 2:
        cli.fail(f"{path} holds {images.shape[0]} image(s); FID and KID need at least 2")
    return images


@functools.lru_cache(maxsize=None)
def load_split(dataset: str, split: str, data_dir: str, manual_dir: str):
    """data.load_split, its messages naming this script's flags; each split is read once
    (--ckpt uses the test split for the metrics and for bits/dim)."""
    from ddpm_jax import data
    from ddpm_jax.errors import UserError

    try:
        return data.load_split(dataset, split, data_dir=data_dir, manual_dir=manual_dir)
    except UserError as e:
        raise UserError(str(e).replace("--config.data.manual_dir", "--manual-dir")) from None


def _emit(result: dict) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if flag("json"):
        try:
            with open(flag("json"), "w") as f:
                f.write(text + "\n")
        except OSError as e:
            cli.fail(f"could not write {flag('json')}: {e.strerror or e}")
        note(f"Wrote {flag('json')}")


# --------------------------------------------------------------------------- modes


def train_classifier_mode(dataset: str) -> dict:
    import time

    from ddpm_jax import evaluation
    from ddpm_jax.data import class_names

    folder = evaluation.classifier_dir(dataset, flag("cache-dir"))
    if os.path.exists(folder) and not flag("overwrite"):
        cli.fail(f"a {dataset} classifier exists in {folder}; pass --overwrite to retrain it")
    defaults = evaluation.ClassifierConfig()
    channels = flag("classifier-channels")
    config = evaluation.ClassifierConfig(
        channels=tuple(int(c) for c in channels) if channels else defaults.channels,
        features=flag("classifier-features") or defaults.features,
        epochs=flag("classifier-epochs") or defaults.epochs,
        seed=flag("seed"),
        train_images=flag("classifier-train-images"),
    )
    images, labels = load_split(dataset, "train", flag("data-dir"), flag("manual-dir"))
    test_images, test_labels = load_split(dataset, "test", flag("data-dir"), flag("manual-dir"))
    note(f"Training the {dataset} classifier ({config.epochs} epochs on "
         f"{config.train_images or len(images)} images)")
    start = time.monotonic()
    model, params, losses = evaluation.train_classifier(images, labels, config, num_classes=len(class_names(dataset)),
                                                        progress=flag("progress"))
    seconds = time.monotonic() - start
    _, logits = evaluation.classifier_outputs(model, params, test_images, progress=flag("progress"))
    acc = evaluation.accuracy(logits, test_labels)
    info = evaluation.classifier_info(config, dataset=dataset, image_shape=images.shape[1:],
                                      num_classes=model.num_classes, test_accuracy=acc,
                                      train_images=min(config.train_images or len(images), len(images)),
                                      train_seconds=seconds, epoch_losses=losses)
    evaluation.save_classifier(folder, params, info, overwrite=flag("overwrite"))
    note(f"{dataset} classifier: test accuracy {100 * acc:.2f} % after {seconds:.0f} s of training; saved to {folder}")
    return {"classifier": folder, **info}


def evaluate_images(samples, dataset: str, folder: str, data_dir: str, manual_dir: str, labels=None) -> dict:
    """Metrics of uint8 samples (N, H, W, C) and of N training images, both against the test split.
    labels: the classes a conditional model was asked for, (N,), or None."""
    import numpy as np

    from ddpm_jax import evaluation
    from ddpm_jax.data import class_names

    model, params, info = evaluation.load_classifier(folder)
    train_images, _ = load_split(dataset, "train", data_dir, manual_dir)
    test_images, _ = load_split(dataset, "test", data_dir, manual_dir)
    # The reference: as many training images as samples (a fixed random subset).
    n_ref = min(len(samples), len(train_images))
    real = train_images[np.sort(np.random.default_rng(0).choice(len(train_images), n_ref, replace=False))]
    progress = flag("progress")
    test_features, _ = evaluation.classifier_outputs(model, params, test_images, progress=progress)
    sample_features, sample_logits = evaluation.classifier_outputs(model, params, samples, progress=progress)
    real_features, real_logits = evaluation.classifier_outputs(model, params, real, progress=progress)
    names = class_names(dataset)
    common = dict(class_names=names, kid_subsets=flag("kid-subsets"), kid_subset_size=flag("kid-subset-size"))
    sample_report = evaluation.compare_features(sample_features, sample_logits, test_features, **common)
    if labels is not None:  # how often the classifier sees the class the model was asked for
        sample_report["label_accuracy"] = evaluation.accuracy(sample_logits, labels)
    return {
        "dataset": dataset,
        "against": f"{dataset} test split ({len(test_images)} images)",
        "samples": sample_report,
        "real_reference": {
            "what": f"{n_ref} training images vs the test split: what an ideal generator scores with this many samples",
            **evaluation.compare_features(real_features, real_logits, test_features, **common),
        },
        "max_class_entropy_nats": math.log(len(names)),
        "classifier": {"folder": folder, "test_accuracy": info["test_accuracy"],
                       "architecture": f"{info['architecture']} v{info['arch_version']} channels {info['channels']}, "
                                       f"{info['features']} features"},
    }


def samples_mode() -> dict:
    dataset = flag("dataset")
    if not dataset:
        cli.fail("--samples needs --dataset (fashion_mnist or mnist): the data the samples imitate")
    _check_dataset(dataset)
    samples = _read_samples(flag("samples"))
    folder, info = _stored_classifier_info(dataset)
    if tuple(samples.shape[1:]) != tuple(info["image_shape"]):
        cli.fail(f"{flag('samples')}: images of shape {samples.shape[1:]}, but {dataset} images are "
                 f"{tuple(info['image_shape'])}")
    note(f"Evaluating {len(samples)} samples from {flag('samples')} against {dataset}")
    result = evaluate_images(samples, dataset, folder, flag("data-dir"), flag("manual-dir"))
    return {"source": {"samples": os.path.abspath(flag("samples"))}, **result}


def _sample_labels(trained, num: int):
    """Labels for a conditional model's samples (None for an unconditional one, or with --labels none):
    balanced, sample i of class i mod K."""
    if not trained.num_classes or flag("labels") == "none":
        if flag("labels") == "balanced":
            cli.fail("--labels balanced: this model is unconditional")
        return None
    import numpy as np

    return np.arange(num) % trained.num_classes


def ckpt_mode() -> dict:
    import numpy as np

    from ddpm_jax.data import from_model_range
    from ddpm_jax.generate import generate, load_trained, sample_options
    from ddpm_jax.parallel import make_mesh

    trained = load_trained(flag("ckpt"), which=flag("which"), weights=flag("weights"))
    config = trained.config
    dataset = config.data.name
    if flag("dataset") and flag("dataset") != dataset:
        cli.fail(f"--dataset {flag('dataset')} but the checkpoint was trained on {dataset}; drop --dataset")
    data_dir = flag("data-dir") or config.data.data_dir
    manual_dir = flag("manual-dir") or config.data.manual_dir
    if not flag("num") and not flag("bpd-images"):
        cli.fail("nothing to do: --num 0 and --bpd-images 0")
    folder = None
    if flag("num"):
        if flag("num") < 2:
            cli.fail(f"--num {flag('num')}: FID and KID need at least 2 samples (or --num 0 for bits/dim only)")
        folder, _ = _stored_classifier_info(dataset)  # before the long sampling
    labels = _sample_labels(trained, flag("num"))
    options = sample_options(config, sampler=flag("sampler"), steps=flag("steps"), eta=flag("eta"),
                             sigma=flag("sigma"), guidance=flag("guidance"))
    if labels is None:
        options["guidance"] = 0.0
    result = {"source": {"ckpt": os.path.abspath(flag("ckpt")), "checkpoint_dir": trained.meta.get("checkpoint_dir"),
                         "checkpoint_step": trained.meta.get("checkpoint_step"), "which": flag("which"),
                         "weights": trained.weights, "seed": flag("seed"),
                         "labels": "balanced" if labels is not None else "none", **options}}
    if flag("num"):
        note(f"Sampling {flag('num')} images ({options['sampler']}, {options['steps'] or 'all'} steps, "
             f"{trained.weights} weights)")
        x0, _ = generate(trained, num=flag("num"), seed=flag("seed"), labels=labels, batch_size=flag("batch"),
                         progress=flag("progress"), mesh=make_mesh(), **options)
        samples = from_model_range(x0, clip=True)
        if flag("save-samples"):
            np.savez(flag("save-samples"), arr_0=samples)
            note(f"Wrote {flag('save-samples')}")
        result.update(evaluate_images(samples, dataset, folder, data_dir, manual_dir, labels=labels))
    else:
        result["dataset"] = dataset
    if flag("bpd-images"):
        result["bits_per_dim"] = _bits_per_dim(trained, dataset, data_dir, manual_dir, options)
    return result


def _bits_per_dim(trained, dataset: str, data_dir: str, manual_dir: str, options: dict) -> dict:
    """Bits/dim of the first --bpd-images test images under the model that DDPM sampling with
    these options draws from (its sigma and clip_x0); a conditional model is run without labels."""
    import jax
    import numpy as np

    from ddpm_jax import evaluation

    test_images, _ = load_split(dataset, "test", data_dir, manual_dir)
    images = test_images[:flag("bpd-images")]
    note(f"Bits/dim of {len(images)} test images ({trained.schedule.n_steps} model evaluations each)")
    bpd = evaluation.bits_per_dim(trained.eps_fn, trained.params, trained.schedule, images,
                                  key=jax.random.fold_in(jax.random.key(flag("seed")), 1), sigma=options["sigma"],
                                  clip_x0=bool(options["clip_x0"]), batch_size=flag("batch"), progress=flag("progress"))
    return {
        "mean": bpd.mean,
        "std_error": float(np.std(bpd.per_image, ddof=1) / math.sqrt(len(images))) if len(images) > 1 else None,
        "num_images": len(images),
        "sigma": options["sigma"],
        "clip_x0": bool(options["clip_x0"]),
        "decoder_L0": float(bpd.terms[0]),
        "kl_terms": float(bpd.terms[1:].sum()),
        "prior_LT": bpd.prior,
    }


def main():
    modes = [name for name, on in (("--samples", flag("samples")), ("--ckpt", flag("ckpt")),
                                   ("--train-classifier", flag("train-classifier"))) if on]
    if len(modes) != 1:
        cli.fail("give exactly one of --samples FILE, --ckpt PATH or --train-classifier"
                 + (f" (got {' and '.join(modes)})" if modes else ""))
    if flag("dataset"):
        _check_dataset(flag("dataset"))
    outputs = [p for p in (flag("json"), flag("save-samples") if flag("ckpt") else "") if p]
    for path in outputs:
        cli.check_output(path, flag("overwrite"))
    if flag("save-samples") and not flag("save-samples").endswith(".npz"):
        cli.fail(f"--save-samples {flag('save-samples')}: the name must end in .npz")
    if flag("train-classifier"):
        if not flag("dataset"):
            cli.fail("--train-classifier needs --dataset (fashion_mnist or mnist)")
        result = train_classifier_mode(flag("dataset"))
    elif flag("samples"):
        result = samples_mode()
    else:
        result = ckpt_mode()
    _emit(result)


if __name__ == "__main__":
    cli.run(main)
