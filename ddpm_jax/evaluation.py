"""What evaluate.py runs: sample-quality reports (metrics.py on classifier.py's features, each
beside a real-data reference) and bits/dim (likelihood.py) of a checkpoint.

    train_and_store_classifier("fashion_mnist")                    # once per dataset, cached
    evaluate_samples_file("samples.npz", "fashion_mnist")          # any generator's uint8 NHWC arr_0
    evaluate_checkpoint("runs/fashion", num=10000, bpd_images=1000)

Randomness of a checkpoint's evaluation, from one seed (`streams`): sample i uses
fold_in(key(seed), i), as sample.py; bits/dim draws test image i's noise from
fold_in(fold_in(key(seed), BPD_STREAM), i), a tag no sample index reaches, so the two never
share a key. With `resume_file`, finished sample batches are kept there (uint8, replaced
atomically after each batch) and a rerun continues from them: sample keys depend only on the
sample index, so the resumed samples are the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np

from ddpm_jax.errors import UserError
from ddpm_jax.metrics import check_images

LABELS = ("auto", "balanced", "none")
BPD_STREAM = 2**32 - 1  # fold_in tag of the bits/dim noise; sample indices (int32) stay below 2**31


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def streams(seed: int):
    """(sample key, bits/dim key) of a seed: see the module docstring."""
    import jax

    root = jax.random.key(seed)
    return root, jax.random.fold_in(root, BPD_STREAM)


def save_json(path: str, result: dict) -> None:
    """The result as JSON at path, atomically (viz.atomic_write): never a truncated file."""
    from ddpm_jax.viz import atomic_write

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")

    atomic_write(path, write)


@contextlib.contextmanager
def flag_names():
    """Re-raises a data UserError with evaluate.py's flags in place of the config fields it names
    (evaluate.py takes no folder of images)."""
    try:
        yield
    except UserError as e:
        message = re.sub(r" or 'folder' with --config\.data\.path=\S+", "", str(e))
        for field, flag in (("--config.data.manual_dir", "--manual_dir"), ("--config.data.data_dir", "--data_dir"),
                            ("--config.data.name", "--dataset")):
            message = message.replace(field, flag)
        raise UserError(message) from None


def check_dataset(name: str, data_dir: str = "") -> str:
    """name, if it is a tfds image dataset with class labels (fashion_mnist, mnist, cifar10, ...):
    the classifier behind FID, KID and class entropy learns them. A one-line UserError otherwise."""
    from ddpm_jax import data

    if name == "folder":
        raise UserError("evaluate.py measures against a labelled tfds dataset (its classifier learns the labels); "
                        "a folder of images has no cached classifier: give --dataset the name of a tfds dataset")
    with flag_names():
        if not data.class_names(name, data_dir=data_dir):
            raise UserError(f"{name} has no class labels, which evaluate.py's classifier (FID, KID, class entropy) "
                            "learns: use a labelled tfds dataset")
    return name


def stored_classifier(dataset: str, cache_dir: str = "") -> tuple[str, dict]:
    """(folder, classifier.json) of the dataset's cached classifier; UserError saying how to train it."""
    from ddpm_jax.classifier import classifier_dir, has_classifier, read_classifier_info

    folder = classifier_dir(dataset, cache_dir)
    train = f"python evaluate.py --train_classifier --dataset {dataset}" + (
        f" --cache_dir {cache_dir}" if cache_dir else "")
    if not has_classifier(folder):
        raise UserError(f"no {dataset} classifier in {folder}; train it once with: {train}")
    info = read_classifier_info(folder)
    if info.get("dataset") != dataset:
        raise UserError(f"the classifier in {folder} was trained on {info.get('dataset')!r}, not {dataset!r}; "
                        f"retrain it with {train} --overwrite")
    return folder, info


def train_and_store_classifier(dataset: str, *, data_dir: str = "", manual_dir: str = "", cache_dir: str = "",
                               overwrite: bool = False, progress: bool = False, **config) -> dict:
    """Trains the dataset's classifier, the one classifier.classifier_config_for its image shape with
    the ClassifierConfig fields in `config` (None = that default), on as many classes as it has,
    measures its test accuracy and stores it in the cache. Returns its classifier.json + folder."""
    from ddpm_jax import classifier as cl
    from ddpm_jax import data

    folder = cl.classifier_dir(check_dataset(dataset, data_dir), cache_dir)
    if os.path.exists(folder) and not overwrite:
        raise UserError(f"a {dataset} classifier exists in {folder}; pass --overwrite to retrain it")
    with flag_names():
        images, labels = data.load_split(dataset, "train", data_dir=data_dir, manual_dir=manual_dir)
        test_images, test_labels = data.load_split(dataset, "test", data_dir=data_dir, manual_dir=manual_dir)
    config = dataclasses.replace(cl.classifier_config_for(images.shape[1:]),
                                 **{k: v for k, v in config.items() if v is not None})
    note(f"Training the {dataset} classifier ({config.epochs} epochs on {config.train_images or len(images)} images)")
    start = time.monotonic()
    # After loading: some datasets (cifar10) read their class names from the prepared files.
    num_classes = len(data.class_names(dataset, data_dir=data_dir))
    model, params, losses = cl.train_classifier(images, labels, config, num_classes=num_classes,
                                                progress=progress)
    seconds = time.monotonic() - start
    acc = cl.accuracy(cl.classifier_outputs(model, params, test_images, progress=progress)[1], test_labels)
    info = cl.classifier_info(config, dataset=dataset, image_shape=images.shape[1:], num_classes=model.num_classes,
                              test_accuracy=acc, train_images=min(config.train_images or len(images), len(images)),
                              train_seconds=seconds, epoch_losses=losses)
    cl.save_classifier(folder, params, info, overwrite=overwrite)
    note(f"{dataset} classifier: test accuracy {100 * acc:.2f} % after {seconds:.0f} s of training; saved to {folder}")
    return {"classifier": folder, **info}


def evaluate_images(samples, dataset: str, *, data_dir: str = "", manual_dir: str = "", cache_dir: str = "",
                    labels=None, kid_subsets: int = 100, kid_subset_size: int = 1000, progress: bool = False,
                    test_images=None, what: str = "samples") -> dict:
    """FID, KID and class histogram of uint8 samples (N, H, W, C) and of N training images (a fixed
    random subset: what an ideal generator scores), both against the test split. labels: the
    classes a conditional model was asked for, (N,), or None; what: the samples' name in messages."""
    from ddpm_jax import classifier as cl
    from ddpm_jax import data
    from ddpm_jax.metrics import compare_features, noise_like_share

    folder, info = stored_classifier(dataset, cache_dir)
    if tuple(samples.shape[1:]) != tuple(info["image_shape"]):
        raise UserError(f"{what}: images of shape {samples.shape[1:]}, but {dataset} images are "
                        f"{tuple(info['image_shape'])}")
    model, params, info = cl.load_classifier(folder)
    with flag_names():
        train_images, _ = data.load_split(dataset, "train", data_dir=data_dir, manual_dir=manual_dir)
        if test_images is None:
            test_images, _ = data.load_split(dataset, "test", data_dir=data_dir, manual_dir=manual_dir)
    n_ref = min(len(samples), len(train_images))
    real = train_images[np.sort(np.random.default_rng(0).choice(len(train_images), n_ref, replace=False))]
    test_features, _ = cl.classifier_outputs(model, params, test_images, progress=progress)
    sample_features, sample_logits = cl.classifier_outputs(model, params, samples, progress=progress)
    real_features, real_logits = cl.classifier_outputs(model, params, real, progress=progress)
    names = data.class_names(dataset, data_dir=data_dir)
    common = dict(class_names=names, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    sample_report = compare_features(sample_features, sample_logits, test_features, **common)
    # Noise-like: total variation above the test split's 99.5th percentile (saturated salt and pepper).
    sample_report["noise_like"] = noise_like_share(samples, test_images)
    if labels is not None:  # how often the classifier sees the class the model was asked for
        sample_report["label_accuracy"] = cl.accuracy(sample_logits, labels)
    return {
        "dataset": dataset,
        "against": f"{dataset} test split ({len(test_images)} images)",
        "samples": sample_report,
        "real_reference": {
            "what": f"{n_ref} training images vs the test split: what an ideal generator scores with this many samples",
            **compare_features(real_features, real_logits, test_features, **common),
            "noise_like": noise_like_share(real, test_images),
        },
        "max_class_entropy_nats": math.log(len(names)),
        "classifier": {"folder": folder, "test_accuracy": info["test_accuracy"],
                       "architecture": f"{info['architecture']} v{info['arch_version']} channels {info['channels']}, "
                                       f"{info['features']} features"},
    }


def read_samples(path: str) -> np.ndarray:
    """The uint8 (N, H, W, C) images under arr_0 of an .npz, N >= 2; UserError otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"--samples {path} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "arr_0" not in archive.files:
                raise UserError(f"{path} holds no arr_0 (keys: {', '.join(archive.files) or 'none'}); save the "
                                "images as np.savez(path, arr_0=images)")
            images = archive["arr_0"]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as .npz: {' '.join(str(e).split())}") from None
    images = check_images(images, f"{path}: arr_0")
    if images.shape[0] < 2:
        raise UserError(f"{path} holds {images.shape[0]} image(s); FID and KID need at least 2")
    return images


def evaluate_samples_file(path: str, dataset: str | None, **kwargs) -> dict:
    """evaluate_images of the samples an .npz holds (sample.py --out, or any generator's)."""
    if not dataset:
        raise UserError("--samples needs --dataset (e.g. fashion_mnist, mnist or cifar10): the data the samples "
                        "imitate")
    check_dataset(dataset, kwargs.get("data_dir", ""))
    samples = read_samples(path)
    note(f"Evaluating {len(samples)} samples from {path} against {dataset}")
    return {"source": {"samples": os.path.abspath(path)}, **evaluate_images(samples, dataset, what=path, **kwargs)}


def draw_samples(trained, num: int, *, options, seed: int = 0, labels=None, batch_size: int = 256,
                 resume_file: str = "", progress: bool = False, mesh=None) -> np.ndarray:
    """generate.generate's num samples as uint8 (num, H, W, C), clipped. With resume_file, keeps the
    finished batches there and continues from those of an interrupted run with the same
    checkpoint, weights, seed, labels and options (a SampleOptions): generate.PartialSamples."""
    from ddpm_jax.data import from_model_range
    from ddpm_jax.generate import PartialSamples, generate, run_settings

    partial = PartialSamples(resume_file, run_settings(trained, options, seed=seed, num=num, labels=labels), num)
    if partial.done:
        note(f"Resuming from {resume_file}: {partial.done} of {num} samples already drawn")
    try:
        if partial.done < num:
            generate(trained, num=num, seed=seed, labels=labels, batch_size=batch_size, progress=progress,
                     mesh=mesh, options=options, start=partial.done, on_batch=partial.keep)
    except KeyboardInterrupt:
        if resume_file:
            note(f"{partial.done} of {num} samples kept in {resume_file}; rerun to resume")
        raise
    return from_model_range(partial.x0, clip=True)


def bits_per_dim_report(trained, images, *, key, options, batch_size: int = 256, progress: bool = False) -> dict:
    """Bits/dim of uint8 test images under the model that DDPM sampling with these options draws
    from (its sigma and clip_x0); a conditional model runs without labels."""
    from ddpm_jax.likelihood import bits_per_dim

    note(f"Bits/dim of {len(images)} test images ({trained.schedule.n_steps} model evaluations each)")
    bpd = bits_per_dim(trained.eps_fn, trained.params, trained.schedule, images, key=key, sigma=options.sigma,
                       clip_x0=bool(options.clip_x0), prediction=trained.prediction, batch_size=batch_size,
                       progress=progress)
    return {
        "mean": bpd.mean,
        "std_error": float(np.std(bpd.per_image, ddof=1) / math.sqrt(len(images))) if len(images) > 1 else None,
        "num_images": len(images),
        "sigma": options.sigma,
        "clip_x0": bool(options.clip_x0),
        "decoder_L0": float(bpd.terms[0]),
        "kl_terms": float(bpd.terms[1:].sum()),
        "prior_LT": bpd.prior,
    }


def evaluate_checkpoint(ckpt: str, *, which: str = "best", weights: str = "auto", num: int = 10000, seed: int = 0,
                        labels: str = "auto", batch_size: int = 256, bpd_images: int = 1000, dataset: str | None = None,
                        data_dir: str = "", manual_dir: str = "", cache_dir: str = "", save_samples: str = "",
                        resume_file: str = "", kid_subsets: int = 100, kid_subset_size: int = 1000,
                        progress: bool = False, **overrides) -> dict:
    """Samples num images from a checkpoint and evaluates them (evaluate_images), and bits/dim of
    its first bpd_images test images. overrides: SampleOptions fields (sampler, steps, sigma, eta,
    clip_x0, guidance, spacing; None = the checkpoint config's). save_samples: also write the
    samples there (.npz, arr_0). resume_file: see draw_samples; removed once the evaluation is done."""
    from ddpm_jax.data import load_config_split
    from ddpm_jax.generate import load_trained, sample_options
    from ddpm_jax.parallel import make_mesh

    if not num and not bpd_images:
        raise UserError("nothing to do: --num 0 and --bpd_images 0")
    if num == 1:
        raise UserError("--num 1: FID and KID need at least 2 samples (or --num 0 for bits/dim only)")
    trained = load_trained(ckpt, which=which, weights=weights)
    config = trained.config
    if dataset and dataset != config.data.name:
        raise UserError(f"--dataset {dataset} but the checkpoint was trained on {config.data.name}; drop --dataset")
    dataset = config.data.name
    data_dir, manual_dir = data_dir or config.data.data_dir, manual_dir or config.data.manual_dir
    if num:  # before the long sampling
        _, info = stored_classifier(check_dataset(dataset, data_dir), cache_dir)
        if tuple(info["image_shape"]) != tuple(trained.image_shape):
            raise UserError(f"the checkpoint's images are {tuple(trained.image_shape)} (config.data resized or "
                            f"converted them), the {dataset} classifier's {tuple(info['image_shape'])}: FID and KID "
                            "need the images as stored; --num 0 measures bits/dim alone")
    if labels not in LABELS or (labels == "balanced" and not trained.num_classes):
        raise UserError(f"--labels {labels}: use auto, none or (a conditional model) balanced")
    class_labels = None if labels == "none" or not trained.num_classes else np.arange(num) % trained.num_classes
    options = sample_options(config, **overrides)  # checked: UserError naming the flag
    if class_labels is None:
        options = dataclasses.replace(options, guidance=0.0)  # guidance needs a class to guide towards
    result = {"source": {"ckpt": os.path.abspath(ckpt), "checkpoint_dir": trained.meta.get("checkpoint_dir"),
                         "checkpoint_step": trained.meta.get("checkpoint_step"), "which": which,
                         "weights": trained.weights, "seed": seed,
                         "labels": "balanced" if class_labels is not None else "none", **dataclasses.asdict(options)},
              "dataset": dataset}
    # As the model saw them (resized, converted); with num > 0 that is as stored (checked above).
    data_config = config.data.copy_and_resolve_references()
    data_config.data_dir, data_config.manual_dir = data_dir, manual_dir
    with flag_names():
        test_images = load_config_split(data_config, "test")[0]
    if num:
        note(f"Sampling {num} images ({options.sampler}, {options.steps or 'all'} steps, {trained.weights} weights)")
        samples = draw_samples(trained, num, options=options, seed=seed, labels=class_labels, batch_size=batch_size,
                               resume_file=resume_file, progress=progress, mesh=make_mesh())
        if save_samples:
            from ddpm_jax.generate import save_npz

            save_npz(save_samples, arr_0=samples)
            note(f"Wrote {save_samples}")
        result.update(evaluate_images(samples, dataset, data_dir=data_dir, manual_dir=manual_dir, cache_dir=cache_dir,
                                      labels=class_labels, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                      progress=progress, test_images=test_images))
    if bpd_images:
        result["bits_per_dim"] = bits_per_dim_report(trained, test_images[:bpd_images], key=streams(seed)[1],
                                                     options=options, batch_size=batch_size, progress=progress)
    if resume_file and os.path.exists(resume_file):
        os.remove(resume_file)
    return result
