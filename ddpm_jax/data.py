"""Datasets: read a whole tfds split into memory, and convert pixels to/from the model range.

Images are NHWC ``uint8`` on the host, ``(N, H, W, C)`` (``(N, 28, 28, 1)`` for
Fashion-MNIST and MNIST), labels ``int32`` ``(N,)``. The model works in [-1, 1]:
:func:`to_model_range` is the article's ``ToTensor()`` followed by
``Lambda(lambda x: (x - 0.5) * 2)``; :func:`from_model_range` goes back.

Where the data comes from (:func:`load_split`)
---------------------------------------------
* A split already prepared in the tfds ``data_dir`` is read as it is, in tfds' own
  order (no shuffling): through ``builder.as_data_source`` (array_record, no
  TensorFlow import, ~4 s for 60,000 images on 2 slow cores), or through
  ``as_dataset(batch_size=-1)`` when the data was prepared in tfds' default
  tfrecord format by something else.
* Otherwise the dataset is prepared (in array_record format) from the original
  archives, never from tfds' pre-built copies on GCS:

  - ``manual_dir`` set: the official ``.gz`` archives are taken from that folder,
    either directly (``DIR/train-images-idx3-ubyte.gz`` ...) or from a per-dataset
    subfolder (``DIR/fashion_mnist/train-images-idx3-ubyte.gz`` ...). tfds checks
    them against its registered size and SHA-256; nothing is downloaded.
  - ``manual_dir`` empty: the hosts tfds would download from are probed first
    (TCP connect, 3 s); if one cannot be reached, a :class:`UserError` says so at
    once instead of letting tfds retry for minutes.

* Every problem a user can fix (unknown name, not prepared and no network,
  missing or wrong archives) is a one-line :class:`ddpm_jax.errors.UserError`.

tensorflow_datasets is imported inside the functions, so ``import ddpm_jax.data``
stays cheap. ``tfds.testing.mock_data`` is supported: an unprepared dataset is
first read through tfds (which the mock serves) before anything is diagnosed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError

SUPPORTED_DATASETS = ("fashion_mnist", "mnist")

# How long the connectivity probe waits before calling a download host unreachable.
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


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else ""


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
    for the Fashion-MNIST/MNIST train split), labels int32 ``(N,)``.

    ``data_dir``: the tfds data folder ('' = tfds' default, ``~/tensorflow_datasets``
    or ``$TFDS_DATA_DIR``). ``manual_dir``: a folder holding the official archives
    (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``), directly or in
    ``manual_dir/<name>/``; used only when the dataset is not prepared yet.
    ``split`` is any tfds split string ('train', 'test', 'train[:10%]', ...).

    Raises UserError for an unknown name or split, for a dataset that is not prepared
    and cannot be downloaded, and for missing or corrupt archives in ``manual_dir``.
    """
    _check_name(name)
    import tensorflow_datasets as tfds

    data_dir, manual_dir = _abspath(data_dir), _abspath(manual_dir)
    builder = tfds.builder(name, data_dir=data_dir or None)
    if builder.is_prepared():
        return _read(builder, split)
    # Not prepared here; under tfds.testing.mock_data reading works all the same.
    try:
        return _read(builder, split)
    except UserError:
        raise
    except Exception:  # genuinely not prepared: prepare it below
        pass
    _prepare(builder, manual_dir)
    return _read(tfds.builder(name, data_dir=data_dir or None), split)


def _read(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of ``split`` as (uint8 NHWC images, int32 labels)."""
    import tensorflow_datasets as tfds

    image_key, label_key = builder.info.supervised_keys
    try:
        try:
            source = builder.as_data_source(split=split)
        except NotImplementedError:  # prepared as tfrecord (tfds' default) elsewhere
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            images, labels = arrays[image_key], arrays[label_key]
        else:
            try:
                records = source.__getitems__(list(range(len(source))))  # one batched read: ~2x faster
            except TypeError:
                # tfds.testing.mock_data (tfds 4.9.10) installs a __getitems__ that cannot be
                # called (its partial lacks `self`); its __getitem__ works.
                records = [source[i] for i in range(len(source))]
            images = (np.stack([r[image_key] for r in records]) if records
                      else np.zeros((0, *builder.info.features[image_key].shape), np.uint8))
            labels = np.array([r[label_key] for r in records])
    except (KeyError, ValueError) as e:
        if builder.is_prepared() and split.split("[")[0] not in builder.info.splits:
            raise UserError(
                f"unknown split {split!r} of {builder.name}: available splits are "
                f"{', '.join(sorted(builder.info.splits))}"
            ) from e
        raise
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(
            f"{builder.name} does not hold fixed-size uint8 images (got {images.dtype} {images.shape}); "
            f"supported datasets are {', '.join(SUPPORTED_DATASETS)}"
        )
    return images, np.asarray(labels, dtype=np.int32)


def _prepare(builder, manual_dir: str) -> None:
    """Download-and-prepare ``builder`` in array_record format, from manual_dir or the network."""
    import tensorflow_datasets as tfds

    name, root = builder.name, os.fspath(builder.data_dir_root)
    variant_dir = builder.data_path
    if variant_dir.exists():
        # tfds would silently "reuse" it and the read would fail later.
        raise UserError(
            f"{variant_dir} exists but is not a complete tfds dataset (no dataset_info.json/features.json); "
            "move it away and try again"
        )
    url_infos = builder.url_infos or {}
    if manual_dir:
        source = _manual_source(name, manual_dir, url_infos)
        # tfds checks the same registered size/SHA-256, but one archive at a time while
        # it already extracts the others in background threads (which outlive its
        # error); checking all first (~0.1 s) names every bad file and starts nothing.
        bad = _checksum_mismatches(source, url_infos)
        if bad:
            raise UserError(_checksum_message(source, name, bad))
        # The archives are read from `source`; tfds' download/extract folders are only
        # scratch space here (~55 MB of decompressed IDX files), so they go to a temp dir.
        with tempfile.TemporaryDirectory(prefix=f"ddpm_jax-{name}-") as scratch:
            config = tfds.download.DownloadConfig(
                manual_dir=source, extract_dir=os.path.join(scratch, "extracted"), try_download_gcs=False
            )
            try:
                builder.download_and_prepare(
                    download_dir=os.path.join(scratch, "downloads"), download_config=config, file_format="array_record"
                )
            except Exception as e:
                if type(e).__name__ != "NonMatchingChecksumError":
                    raise
                bad = _checksum_mismatches(source, url_infos) or [str(e).splitlines()[0]]
                raise UserError(_checksum_message(source, name, bad)) from None
    else:
        unreachable = _unreachable(_download_endpoints(url_infos))
        if unreachable:
            raise UserError(
                f"{name} is not prepared in {root} and cannot be downloaded (no network: cannot reach "
                f"{', '.join(unreachable)}); pass --config.data.manual_dir=DIR with a folder holding the "
                f"official archives ({', '.join(_expected_files(url_infos))})"
            )
        config = tfds.download.DownloadConfig(try_download_gcs=False)
        builder.download_and_prepare(download_config=config, file_format="array_record")


def _expected_files(url_infos: dict) -> list[str]:
    return sorted(info.filename or os.path.basename(urllib.parse.urlsplit(url).path) for url, info in url_infos.items())


def _manual_source(name: str, manual_dir: str, url_infos: dict) -> str:
    """The folder holding all archives tfds wants: manual_dir itself or manual_dir/<name>."""
    if not os.path.isdir(manual_dir):
        raise UserError(f"manual_dir {manual_dir} does not exist or is not a folder; point it at the official {name} archives")
    expected = _expected_files(url_infos)
    candidates = [manual_dir, os.path.join(manual_dir, name)]
    missing = {d: [f for f in expected if not os.path.isfile(os.path.join(d, f))] for d in candidates}
    for d in candidates:
        if not missing[d]:
            return d
    best = min(candidates, key=lambda d: len(missing[d]))  # manual_dir on ties
    raise UserError(
        f"manual_dir {best}: missing {', '.join(missing[best])} for {name}; put the official archives "
        f"({', '.join(expected)}) in {manual_dir} or in {os.path.join(manual_dir, name)}"
    )


def _checksum_message(folder: str, name: str, bad: list[str]) -> str:
    return (
        f"manual_dir {folder}: {'; '.join(bad)} (does not match the checksum tfds registers for {name}); "
        "replace it with the official archive"
    )


def _checksum_mismatches(folder: str, url_infos: dict) -> list[str]:
    """'file: N bytes, expected M' / 'file: wrong SHA-256' for each archive tfds would reject."""
    bad = []
    for info in url_infos.values():
        path = os.path.join(folder, info.filename)
        size = os.path.getsize(path)
        if size != info.size:
            bad.append(f"{info.filename} has {size} bytes, expected {int(info.size)}")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != info.checksum:
            bad.append(f"{info.filename} has the wrong SHA-256")
    return sorted(bad)


def _download_endpoints(url_infos: dict) -> list[tuple[str, int]]:
    """(host, port) pairs tfds connects to for these URLs: the URL's host, or the proxy's."""
    proxies = urllib.request.getproxies()
    endpoints = set()
    for url in url_infos:
        parts = urllib.parse.urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        proxy = proxies.get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            endpoints.add((p.hostname, p.port or (443 if p.scheme == "https" else 80)))
        else:
            endpoints.add((parts.hostname, parts.port or default_port))
    return sorted(endpoints)


def _unreachable(endpoints: list[tuple[str, int]], timeout: float = _PROBE_TIMEOUT_S) -> list[str]:
    """The 'host:port' endpoints a TCP connection cannot be opened to within ``timeout`` s.

    Probes run in daemon threads so a slow DNS lookup cannot hold the caller past
    the deadline either.
    """
    ok: dict[tuple[str, int], bool] = {}

    def probe(endpoint):
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
            ok[endpoint] = True
        except OSError:
            ok[endpoint] = False

    threads = [threading.Thread(target=probe, args=(ep,), daemon=True) for ep in endpoints]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [f"{h}:{p}" for h, p in endpoints if not ok.get((h, p), False)]
