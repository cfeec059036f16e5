"""Datasets: read a whole tfds split into memory, and convert pixels to/from the model range.

Images are NHWC ``uint8`` on the host, ``(N, H, W, C)`` (``(N, 28, 28, 1)`` for
Fashion-MNIST and MNIST), labels ``int32`` ``(N,)``. The model works in [-1, 1]:
:func:`to_model_range` is the article's ``ToTensor()`` followed by
``Lambda(lambda x: (x - 0.5) * 2)``; :func:`from_model_range` goes back.

Where the data comes from (:func:`load_split`): a split prepared in the tfds ``data_dir``
is read as it is, in tfds' own order (``builder.as_data_source``: array_record, no
TensorFlow import; or ``as_dataset`` for data prepared as tfrecord elsewhere). Otherwise
tfds prepares it (array_record) from the archives its dataset code registers, taken from
``manual_dir`` when set (tfds checks them against its registered checksums), else
downloaded; tfds would retry an unreachable host for minutes, so one request with a
3-second timeout is tried first. Every problem a user can fix is a one-line
:class:`ddpm_jax.errors.UserError`.

tensorflow_datasets is imported inside the functions, so ``import ddpm_jax.data`` stays
cheap. Under ``tfds.testing.mock_data`` an unprepared dataset is read from the mock.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError

SUPPORTED_DATASETS = ("fashion_mnist", "mnist")

# How long the download check waits for the first archive's host to answer.
_PROBE_TIMEOUT_S = 3.0


# --------------------------------------------------------------------------- pixels


# to_model_range's value for each uint8 pixel, computed in float32 as the article does
# (torch: x.float().div(255), then (x - 0.5) * 2). A table rather than arithmetic under
# jit: XLA rewrites `x / 255` as `x * (1 / 255)`, which is 1 ulp off for some pixels.
_U8_TO_MODEL = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) * np.float32(2)


def to_model_range(images_u8):
    """uint8 pixels, any shape (e.g. NHWC ``(N, H, W, C)``) -> float32 in [-1, 1], same shape.

    ``(x / 255 - 0.5) * 2`` in float32, bit for bit as the article's ``ToTensor()``
    + ``Lambda(lambda x: (x - 0.5) * 2)``: 0 -> -1.0, 255 -> 1.0. Accepts numpy or
    jax arrays and returns a jax array; traceable, so it runs inside ``jit`` on the
    device. Raises TypeError for a dtype other than uint8.
    """
    images_u8 = jnp.asarray(images_u8)
    if images_u8.dtype != jnp.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got dtype {images_u8.dtype}")
    return jnp.asarray(_U8_TO_MODEL)[images_u8]


def from_model_range(x, clip: bool = True) -> np.ndarray:
    """float in [-1, 1] (any shape, numpy or jax) -> numpy uint8 in [0, 255], same shape.

    ``round((x + 1) / 2 * 255)``, rounding half up (as ``ddpm_jax.viz``), so
    ``from_model_range(to_model_range(u))`` is ``u`` for every uint8 value.
    ``clip=True`` clips to [-1, 1] first (model samples may leave the range);
    ``clip=False`` raises ValueError for a value outside [-1, 1]. Non-finite values
    (NaN/inf, e.g. a diverged sampler) always raise ValueError.
    """
    v = np.asarray(x, dtype=np.float64)
    if not np.isfinite(v).all():
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        raise ValueError(f"{bad} non-finite value(s) (NaN or inf); the model or sampler has probably diverged")
    if clip:
        v = np.clip(v, -1.0, 1.0)
    elif v.size and (v.min() < -1.0 or v.max() > 1.0):
        raise ValueError(f"values outside [-1, 1] (min {v.min():.4g}, max {v.max():.4g}) with clip=False")
    return np.floor((v + 1.0) * 127.5 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- datasets


def _check_name(name: str) -> None:
    if name not in SUPPORTED_DATASETS:
        raise UserError(f"unknown dataset {name!r}: supported datasets are {', '.join(SUPPORTED_DATASETS)}")


def class_names(name: str) -> list[str]:
    """The label names of dataset ``name``, index = label, from tfds' own metadata.

    fashion_mnist: 'T-shirt/top', 'Trouser', ..., 'Ankle boot'; mnist: '0'..'9'.
    Needs no prepared data (the names live in the dataset's code).
    """
    _check_name(name)
    import tensorflow_datasets as tfds

    builder = tfds.builder(name)
    _, label_key = builder.info.supervised_keys
    return list(builder.info.features[label_key].names)


def label_index(label: str, name: str) -> int:
    """A class of dataset `name` as its index, from the index ('7') or its name, any case, with or
    without punctuation ('sneaker', 'Ankle boot', 'ankle_boot', 't-shirt'); UserError otherwise."""
    names = class_names(name)
    if label.strip().isdigit() and int(label) < len(names):
        return int(label)

    def squash(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    wanted = squash(label)
    for index, full in enumerate(names):
        if wanted and (wanted == squash(full) or wanted in (squash(part) for part in full.split("/"))):
            return index
    raise UserError(f"unknown {name} label {label!r}: use 0..{len(names) - 1} or one of "
                    + ", ".join(repr(n) for n in names))


def load_split(
    name: str, split: str = "train", *, data_dir: str = "", manual_dir: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """The whole split of tfds dataset ``name`` in memory, in tfds' order.

    Returns ``(images, labels)``: images uint8 ``(N, H, W, C)`` (``(60000, 28, 28, 1)``
    for the Fashion-MNIST/MNIST train split), labels int32 ``(N,)``. ``split`` is any
    tfds split string ('train', 'test', 'train[:10%]', ...).

    ``data_dir``: the tfds data folder ('' = tfds' default, ``~/tensorflow_datasets``
    or ``$TFDS_DATA_DIR``). ``manual_dir``: a folder holding the archives tfds registers
    for ``name`` (for MNIST and Fashion-MNIST ``train-images-idx3-ubyte.gz``, ...), directly
    or in ``manual_dir/<name>/``; used only to prepare a dataset not prepared yet.
    """
    _check_name(name)
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None)
    if not builder.is_prepared():
        try:
            return _read(builder, split)  # tfds.testing.mock_data serves unprepared datasets
        except NotImplementedError:  # no data to read: prepare it
            _prepare(builder, os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else "")
    return _read(builder, split)


def _read(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of ``split``: (uint8 images (N, H, W, C), int32 labels (N,))."""
    import tensorflow_datasets as tfds

    image_key, label_key = builder.info.supervised_keys
    try:
        try:
            source = builder.as_data_source(split=split)
        except NotImplementedError:
            if not builder.is_prepared():
                raise
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))  # prepared as tfrecord
            images, labels = arrays[image_key], arrays[label_key]
        else:
            try:
                records = source.__getitems__(list(range(len(source))))  # one batched read: ~2x faster
            except TypeError:  # tfds.testing.mock_data's source (tfds 4.9.10) cannot read a batch
                records = [source[i] for i in range(len(source))]
            images = (np.stack([r[image_key] for r in records]) if records
                      else np.zeros((0, *builder.info.features[image_key].shape), np.uint8))
            labels = np.array([r[label_key] for r in records])
    except (KeyError, ValueError) as e:  # e.g. tfds' "Unknown split 'valid'. Should be one of ['test', 'train']."
        raise UserError(f"cannot read split {split!r} of {builder.name}: {' '.join(str(e).split())}") from e
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{builder.name} does not hold fixed-size uint8 images (got {images.dtype} {images.shape})")
    return images, np.asarray(labels, dtype=np.int32)


def _prepare(builder, manual_dir: str) -> None:
    """tfds' download_and_prepare (array_record), from the archives in ``manual_dir`` or downloaded.

    tfds keeps its downloads and extracted archives in ``<data_dir>/downloads`` (reused by a
    later attempt; ~55 MB for MNIST or Fashion-MNIST, safe to delete once prepared).
    """
    import tensorflow_datasets as tfds

    if manual_dir:
        manual_dir = _archives_folder(builder.name, manual_dir, _archives(builder))
    else:
        _check_reachable(builder)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None, try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config, file_format="array_record")
    except tfds.core.download.download_manager.NonMatchingChecksumError as e:
        # tfds: "Artifact URL, downloaded to PATH, has wrong checksum: ..."
        found = re.search(r"Artifact (\S+), downloaded to (\S+), has wrong checksum", str(e))
        what, source = (f"{found[2]} does not", f" from {found[1]}") if found else ("an archive does not", "")
        raise UserError(f"{what} match the checksum tfds registers for {builder.name} (truncated or not the "
                        f"official file); re-download it{source} and try again") from None
    except tfds.download.DownloadError as e:
        raise UserError(f"cannot download {builder.name}: {' '.join(str(e).split())}; pass "
                        "--config.data.manual_dir=DIR with a folder holding its archives") from None


def _archives(builder) -> list[str]:
    """The file names of the archives tfds registers for the dataset (sorted)."""
    return sorted(info.filename for info in (builder.url_infos or {}).values())


def _archives_folder(name: str, manual_dir: str, files: list[str]) -> str:
    """``manual_dir/<name>`` if it is a folder, else ``manual_dir``; UserError if an archive is missing."""
    if not os.path.isdir(manual_dir):
        raise UserError(f"manual_dir {manual_dir} does not exist or is not a folder; point it at the {name} archives")
    folder = os.path.join(manual_dir, name) if os.path.isdir(os.path.join(manual_dir, name)) else manual_dir
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:  # tfds would try to download them
        raise UserError(f"manual_dir {folder}: missing {', '.join(missing)} for {name}; put the archives "
                        f"({', '.join(files)}) in {manual_dir} or in {os.path.join(manual_dir, name)}")
    return folder


def _check_reachable(builder) -> None:
    """UserError at once if the first archive tfds would download cannot be reached.

    ``requests`` is tfds' own HTTP client, so the same proxy settings apply.
    """
    import requests

    url = next(iter(builder.url_infos or {}), None)
    if url is None:
        return
    try:
        requests.head(url, timeout=_PROBE_TIMEOUT_S)
    except requests.RequestException as e:
        raise UserError(
            f"{builder.name} is not prepared in {builder.data_dir_root} and cannot be downloaded (no network: "
            f"{type(e).__name__} for {url}); pass --config.data.manual_dir=DIR with a folder holding its "
            f"archives ({', '.join(_archives(builder))})"
        ) from None
