"""Datasets: read a whole split into memory as uint8 images, and convert pixels to/from the model range.

Images are NHWC ``uint8`` on the host, ``(N, H, W, C)`` with C = 1 or 3 (``(N, 28, 28, 1)``
for Fashion-MNIST and MNIST, ``(N, 32, 32, 3)`` for CIFAR-10), labels ``int32`` ``(N,)``.
The model works in [-1, 1]: :func:`to_model_range` is the article's ``ToTensor()`` followed
by ``Lambda(lambda x: (x - 0.5) * 2)``; :func:`from_model_range` goes back.

:func:`load_split` reads any tfds dataset with an image feature (``mnist``, ``cifar10``,
``celeb_a``, ``oxford_flowers102``, ...) or ``"folder"``, a folder of image files.
``image_size`` > 0 resizes each image (shorter side) and centre-crops it to a square;
``channels`` makes it grayscale (1) or RGB (3). Images are converted one at a time and
only the results are kept, so a dataset of large images is never in memory at full size.

tfds: a split prepared in the tfds ``data_dir`` is read as it is, in tfds' own order
(``builder.as_data_source``: array_record, no TensorFlow import; or ``as_dataset`` for data
prepared as tfrecord elsewhere). Otherwise tfds prepares it (array_record) from the archives
its dataset code registers, taken from ``manual_dir`` when set (tfds checks them against its
registered checksums), else downloaded; tfds would retry an unreachable host for minutes, so
one request with a 3-second timeout is tried first. The image is the tfds ``Image`` feature
(the supervised input when the dataset has supervised keys), the label its supervised
``ClassLabel``; a dataset without one gets label 0 everywhere.

Folder: every PNG/JPEG/BMP/GIF/WebP file under ``path`` (recursively, hidden files skipped)
in sorted path order; when every image sits in a first-level subfolder, those subfolders
are the classes (as torchvision's ``ImageFolder``), else every label is 0.

Every problem a user can fix is a one-line :class:`ddpm_jax.errors.UserError`.
tensorflow_datasets and PIL are imported inside the functions, so ``import ddpm_jax.data``
stays cheap. Under ``tfds.testing.mock_data`` an unprepared dataset is read from the mock.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError

# data.name for a folder of image files rather than a tfds dataset.
FOLDER = "folder"
# What a folder dataset reads (any case); PIL decodes them all.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

# How long the download check waits for the first archive's host to answer.
_PROBE_TIMEOUT_S = 3.0
# Examples read from a tfds data source per batched read.
_READ_CHUNK = 1024


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


# --------------------------------------------------------------------------- one image


def _check_image_options(image_size, channels) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 0:
        raise UserError(f"--config.data.image_size must be 0 (as stored) or a size in pixels, got {image_size!r}")
    if isinstance(channels, bool) or channels not in (0, 1, 3):
        raise UserError(f"--config.data.channels must be 0 (as stored), 1 (grayscale) or 3 (RGB), got {channels!r}")


def _flatten_alpha(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C + 1), the last channel alpha -> uint8 (H, W, C) composited on white.

    White rather than dropping alpha: the colour stored under transparent pixels is arbitrary
    (often black), and white is the background such images (icons, sprites) are drawn for.
    """
    colour, alpha = pixels[..., :-1].astype(np.uint32), pixels[..., -1:].astype(np.uint32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _from_16_bits(pixels: np.ndarray) -> np.ndarray:
    """16-bit pixels (any shape, values 0..65535) -> uint8, round(v / 257): 65535 -> 255."""
    return ((np.clip(pixels, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)


def _pil_pixels(image) -> np.ndarray:
    """A decoded PIL image of any mode -> uint8 (H, W, 1) grayscale or (H, W, 3) RGB.

    L, 1, LA, I;16 (16-bit, scaled to 8 bits) and palettes of grays are grayscale; RGB, RGBA,
    CMYK, colour palettes, ... are RGB. Transparency (an alpha band, or a PNG/GIF transparent
    colour) is composited on white (see :func:`_flatten_alpha`).
    """
    from PIL import Image

    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        return _from_16_bits(np.asarray(image))[..., None]
    gray = Image.getmodebase(mode) == "L"
    if image.has_transparency_data:
        pixels = _flatten_alpha(np.asarray(image.convert("LA" if gray else "RGBA")))
    else:
        pixels = np.asarray(image.convert("L" if gray else "RGB"))
    pixels = pixels.reshape(*pixels.shape[:2], -1)
    if mode in ("P", "PA") and (pixels == pixels[..., :1]).all():  # a palette of grays only
        pixels = pixels[..., :1]
    return pixels


def _array_pixels(pixels: np.ndarray, source: str) -> np.ndarray:
    """A tfds image, uint8 or uint16 (H, W, C) with C = 1..4 -> uint8 (H, W, 1) or (H, W, 3), alpha on white."""
    if pixels.dtype == np.uint16:
        pixels = _from_16_bits(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or not 1 <= pixels.shape[-1] <= 4:
        raise UserError(f"{source} holds {pixels.dtype} images of shape {pixels.shape}, not 8- or 16-bit "
                        "grayscale or RGB images; use another dataset")
    return _flatten_alpha(pixels) if pixels.shape[-1] in (2, 4) else pixels


def _resize_and_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (size, size, C): the shorter side resized to size, the centre kept.

    PIL's BICUBIC widens its kernel by the shrink factor, so it is antialiased at any ratio
    (plain bicubic interpolation, e.g. tf.image.resize's default, aliases when shrinking a lot);
    guided-diffusion's box-then-bicubic is a speed shortcut that changes the pixels a little.
    Resizing just the central square (``box=``) is the same as resizing the whole image and
    cropping its centre (the kernel still reads the pixels beside the box), with the crop at
    its exact, possibly half-pixel, centre and no work spent on the pixels the crop drops.
    """
    from PIL import Image

    height, width, channels = pixels.shape
    if (height, width) == (size, size):
        return pixels
    side = min(height, width)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box)).reshape(size, size, channels)


def _fit(pixels: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 (H, W, 1|3) -> (image_size, image_size, channels); 0 keeps the size or the channels."""
    if channels == 1 and pixels.shape[-1] == 3:  # before resizing: a third of the work
        from PIL import Image

        pixels = np.asarray(Image.fromarray(pixels).convert("L"))[..., None]  # ITU-R 601-2 luma
    if image_size:
        pixels = _resize_and_crop(pixels, image_size)
    if channels == 3 and pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels


def _stack(examples, count: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (where, uint8 (H, W, 1|3), label) triples -> (uint8 (count, H, W, C), int32 (count,)).

    Filled in place, so only the converted images are ever held. Grayscale images among colour
    ones are made RGB (a colour image anywhere makes the set RGB). UserError naming two
    images of different sizes.
    """
    images, labels, first = None, np.zeros((count,), np.int32), ""
    for index, (where, pixels, label) in enumerate(examples):
        if images is None:
            images, first = np.empty((count, *pixels.shape), np.uint8), where
        elif pixels.shape[:2] != images.shape[1:3]:
            (h0, w0), (h, w) = images.shape[1:3], pixels.shape[:2]
            raise UserError(f"the images of {source} differ in size ({first} is {w0}x{h0}, {where} is {w}x{h}); "
                            "set --config.data.image_size=N to resize and centre-crop them to N x N")
        elif pixels.shape[-1] > images.shape[-1]:
            images = np.repeat(images, pixels.shape[-1], axis=-1)
        images[index] = pixels  # (H, W, 1) broadcasts into an RGB set
        labels[index] = label
    return images, labels


# --------------------------------------------------------------------------- folders


def _image_files(path: str) -> tuple[str, list[str]]:
    """(the folder, the image files under it as paths relative to it, sorted); UserError if none."""
    if not path:
        raise UserError(f"data.name '{FOLDER}' reads a folder of images: set --config.data.path=DIR")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise UserError(f"--config.data.path {root} does not exist or is not a folder; point it at a folder of images")
    files = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}; "
                        "point --config.data.path at a folder of images")
    return root, sorted(files, key=lambda f: f.split(os.sep))  # a folder's files together, as ImageFolder


def _folder_classes(files: list[str]) -> tuple[list[str], np.ndarray]:
    """(class names, int32 labels): the sorted first-level subfolders when every file is in one, else ([], 0s)."""
    parts = [f.split(os.sep) for f in files]
    if any(len(p) == 1 for p in parts):
        return [], np.zeros((len(files),), np.int32)
    names = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index[p[0]] for p in parts], np.int32)


def _load_folder(path: str, split: str, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    root, files = _image_files(path)
    if split != "train":
        raise UserError(f"a folder dataset has one split, 'train' (every image under {root}), not {split!r}")
    _, labels = _folder_classes(files)

    def examples():
        for rel, label in zip(files, labels):
            try:
                with Image.open(os.path.join(root, rel)) as image:
                    image.load()  # decode now: a truncated file fails here
                    pixels = _pil_pixels(image)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files (OSError, SyntaxError, ...)
                raise UserError(f"cannot read image {os.path.join(root, rel)} ({type(e).__name__}: "
                                f"{' '.join(str(e).split())}); remove or replace it") from None
            yield rel, _fit(pixels, image_size, channels), label

    return _stack(examples(), len(files), root)


# --------------------------------------------------------------------------- tfds


def _builder(name: str, data_dir: str = ""):
    """tfds' builder for ``name``; UserError for a name tfds does not know."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None)
    except tfds.core.registered.DatasetNotFoundError as e:
        guess = re.search(r"Did you mean: \S+ -> (\S+) \?", str(e))  # tfds' spelling suggestion
        hint = f" (did you mean {guess[1]!r}?)" if guess else ""
        raise UserError(f"unknown dataset {name!r}{hint}: set --config.data.name to a tfds dataset name "
                        f"(https://www.tensorflow.org/datasets/catalog) or '{FOLDER}' with --config.data.path=DIR"
                        ) from None
    except AssertionError as e:  # tfds' check of a version or config, e.g. 'cifar10:9.9.9'
        raise UserError(f"dataset {name!r}: {str(e).strip().splitlines()[0]}") from None


def _image_and_label(builder) -> tuple[str, str | None]:
    """The keys of the image feature and of its class label (None: no label) in the dataset's features.

    The supervised input and label when they are an Image and a ClassLabel, else the first Image.
    """
    import tensorflow_datasets as tfds

    features = builder.info.features
    images = [key for key, feature in features.items() if isinstance(feature, tfds.features.Image)]
    if not images:
        raise UserError(f"{builder.name} has no image feature (it has {', '.join(features.keys())}); "
                        f"use a tfds image dataset or '{FOLDER}'")
    supervised = builder.info.supervised_keys
    if isinstance(supervised, tuple) and len(supervised) >= 2 and supervised[0] in images:
        label = supervised[1]
        is_class = isinstance(label, str) and isinstance(features[label], tfds.features.ClassLabel)
        return supervised[0], label if is_class else None
    return images[0], None


def _source_records(source):
    """Every record of a tfds data source, in order, read a chunk at a time."""
    for start in range(0, len(source), _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, len(source))))
        try:
            records = source.__getitems__(keys)  # one batched read: ~2x faster than one by one
        except TypeError:  # tfds.testing.mock_data's source (tfds 4.9.10) cannot read a batch
            records = [source[i] for i in keys]
        yield from records


def _read(builder, split: str, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """All examples of ``split``, converted: (uint8 images (N, H, W, C), int32 labels (N,))."""
    import tensorflow_datasets as tfds

    image_key, label_key = _image_and_label(builder)
    try:
        try:
            source = builder.as_data_source(split=split)
            count, records = len(source), _source_records(source)
        except NotImplementedError:
            if not builder.is_prepared():
                raise
            # Prepared as tfrecord: one example at a time (images may differ in size).
            count = builder.info.splits[split].num_examples
            records = tfds.as_numpy(builder.as_dataset(split=split))
    except (KeyError, ValueError) as e:  # e.g. tfds' "Unknown split 'valid'. Should be one of ['test', 'train']."
        raise UserError(f"cannot read split {split!r} of {builder.name}: {' '.join(str(e).split())}") from None

    def examples():
        for index, record in enumerate(records):
            pixels = _array_pixels(np.asarray(record[image_key]), builder.name)
            yield f"example {index}", _fit(pixels, image_size, channels), record[label_key] if label_key else 0

    images, labels = _stack(examples(), count, f"{builder.name} {split!r}")
    if images is None:  # an empty split
        height, width, stored = builder.info.features[image_key].shape
        images = np.zeros((0, image_size or height or 0, image_size or width or 0, channels or stored or 0), np.uint8)
    return images, labels


# --------------------------------------------------------------------------- datasets


def class_names(name: str, path: str = "", *, data_dir: str = "") -> list[str]:
    """The label names of dataset ``name``, index = label; [] when it has no class labels.

    tfds datasets: from tfds' metadata, which its dataset code holds (fashion_mnist:
    'T-shirt/top', 'Trouser', ..., 'Ankle boot'; mnist: '0'..'9'; celeb_a: []) or, for a few
    datasets, reads from the downloaded files: cifar10's 'airplane', ..., 'truck' come from
    the copy prepared in ``data_dir`` ('' = tfds' default) and are '0'..'9' until then.
    ``"folder"``: the sorted first-level subfolders of ``path`` when every image sits in one, else [].
    """
    if name == FOLDER:
        return _folder_classes(_image_files(path)[1])[0]
    builder = _builder(name, data_dir)
    _, label_key = _image_and_label(builder)
    return list(builder.info.features[label_key].names) if label_key else []


def label_index(label: str, name: str, path: str = "", *, data_dir: str = "") -> int:
    """A class of dataset `name` as its index, from the index ('7') or its name, any case, with or
    without punctuation ('sneaker', 'Ankle boot', 'ankle_boot', 't-shirt'); UserError otherwise.
    ``path`` and ``data_dir`` as for :func:`class_names`."""
    names = class_names(name, path, data_dir=data_dir)
    if not names:
        raise UserError(f"{name} has no class labels; sample without --label")
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
    name: str, split: str = "train", *, data_dir: str = "", manual_dir: str = "", path: str = "",
    image_size: int = 0, channels: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole split of dataset ``name`` in memory, in the dataset's order.

    Returns ``(images, labels)``: images uint8 ``(N, H, W, C)`` (``(60000, 28, 28, 1)``
    for the Fashion-MNIST/MNIST train split), labels int32 ``(N,)`` (0 for a dataset without
    class labels).

    ``name``: a tfds dataset with an image feature, ``split`` any tfds split string ('train',
    'test', 'train[:10%]', ...); or ``"folder"``, the image files under ``path``, whose one
    split is 'train'. ``image_size`` > 0: each image's shorter side resized to it and the
    centre cropped, (N, image_size, image_size, C); 0 keeps the stored size, which must then
    be the same for all. ``channels``: 1 grayscale, 3 RGB, 0 as stored (for a folder: RGB if
    any image has colour, else grayscale).

    ``data_dir``: the tfds data folder ('' = tfds' default, ``~/tensorflow_datasets``
    or ``$TFDS_DATA_DIR``). ``manual_dir``: a folder holding the archives tfds registers
    for ``name`` (for MNIST and Fashion-MNIST ``train-images-idx3-ubyte.gz``, ...), directly
    or in ``manual_dir/<name>/``; used only to prepare a dataset not prepared yet.
    """
    _check_image_options(image_size, channels)
    if name == FOLDER:
        return _load_folder(path, split, image_size, channels)
    builder = _builder(name, data_dir)
    _image_and_label(builder)  # before any download: a dataset without images is refused at once
    if not builder.is_prepared():
        try:
            return _read(builder, split, image_size, channels)  # tfds.testing.mock_data serves unprepared datasets
        except NotImplementedError:  # no data to read: prepare it
            _prepare(builder, os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else "")
    return _read(builder, split, image_size, channels)


def load_config_split(data_config, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_split` of the dataset ``config.data`` describes (its name, data_dir, manual_dir,
    path, image_size and channels)."""
    return load_split(data_config.name, split, data_dir=data_config.data_dir, manual_dir=data_config.manual_dir,
                      path=data_config.path, image_size=data_config.image_size, channels=data_config.channels)


def _prepare(builder, manual_dir: str) -> None:
    """tfds' download_and_prepare (array_record), from the archives in ``manual_dir`` or downloaded.

    tfds keeps its downloads and extracted archives in ``<data_dir>/downloads`` (reused by a
    later attempt; ~55 MB for MNIST or Fashion-MNIST, safe to delete once prepared), the
    extracted ones in ``downloads/extracted/<name>``.
    """
    import tensorflow_datasets as tfds

    if manual_dir:
        manual_dir = _archives_folder(builder.name, manual_dir, _archives(builder))
    elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:  # tfds would fail with a page of instructions
        raise UserError(f"{builder.name} is not prepared in {builder.data_dir_root} and tfds cannot download it: "
                        f"get its files as https://www.tensorflow.org/datasets/catalog/{builder.name} says and pass "
                        "--config.data.manual_dir=DIR with the folder holding them")
    else:
        _check_reachable(builder)
    # tfds extracts an archive from manual_dir to downloads/extracted/GZIP.<file name> and reuses what
    # it finds there; MNIST's and Fashion-MNIST's archives share their names, so each dataset
    # extracts into a folder of its own (or the second one prepared is the first one's images).
    extract_dir = os.path.join(builder.data_dir_root, "downloads", "extracted", builder.name)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None, try_download_gcs=False,
                                          extract_dir=extract_dir)
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
