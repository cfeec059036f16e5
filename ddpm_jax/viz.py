"""Turning image batches into pictures: grids (PNG), forward-process figures and GIFs.

Reproduces the pictures of the article "Generating images with DDPMs: a PyTorch
implementation" (``show_images``, ``show_forward`` and the GIF written by
``generate_new_images``) with plain numpy, einops and imageio. No JAX here: a JAX
array is accepted anywhere an array is (it is converted with ``np.asarray``).

Conventions
-----------
* Images are NHWC: ``(N, H, W, C)``. Float images are in the model range [-1, 1]
  (samples from a model may leave it); ``uint8`` images are already displayable
  and pass through :func:`to_uint8` unchanged.
* A reverse-process trajectory is ``(K, N, H, W, C)``: K recorded frames of a
  batch of N images.
* Every batch is laid out on one near-square grid (:func:`grid_layout`), row-major:
  image ``i`` goes to row ``i // cols``, column ``i % cols``.

Decisions (where the article is silent, inconsistent or broken)
---------------------------------------------------------------
* Layout: ``rows = isqrt(n)``, ``cols = ceil(n / rows)`` for the PNG grid *and* the
  GIF. The article uses ``cols = round(n / rows)`` for its figure (which drops
  images, e.g. n=5 or n=10) and an einops reshape with ``b1 = int(sqrt(n))`` for
  its GIF (which fails unless ``b1`` divides n). Where the article works, the
  layouts agree with it. Empty cells are black (0).
* Rounding: values are mapped to [0, 255] and rounded half up
  (``floor(v + 0.5)``). For ``display='clip'`` the only exact half-way input is
  0.0 -> 127.5 -> 128 (banker's rounding would also give 128).
  ``display='minmax'`` follows the article's per-image normalisation (subtract the
  image's min, scale its max to 255) but rounds to nearest where the article
  truncates with ``astype(uint8)``; so the max is always exactly 255.
* Constant image under 'minmax' (max == min): the article divides by zero (NaN);
  here the image becomes uniformly 0 (black), with no warning.
* Non-finite values (NaN/inf, e.g. a diverged sampler) raise ``ValueError``
  rather than being turned silently into some grey level.
* Separators: PNG grids (:func:`save_grid`, :func:`forward_figure`) put ``pad=2``
  white (255) pixels *between* cells (no outer border), like the gaps of the
  article's matplotlib figure. GIF frames have no separator (``pad=0``), exactly
  the article's einops tiling.
* Size: pictures of small images are hard to see (16 images of 28x28 make a grid
  112 px wide), so :func:`save_grid`, :func:`gif_frames` / :func:`save_gif` and
  :func:`forward_figure` / :func:`save_forward` enlarge every image by an integer
  ``scale`` with nearest neighbour (each pixel becomes a ``scale x scale`` block)
  before tiling. The default (``scale=None``) is :func:`default_scale`, the smallest
  integer that makes the larger side of each image at least ``MIN_IMAGE_PX`` = 112
  pixels (4 for 28x28); ``scale=1`` keeps the images' own size. Separators keep
  their ``pad`` width in pixels. A GIF's default is capped so that a frame stays
  within ``MAX_GIF_PX`` = 480 pixels (:func:`default_gif_scale`): the noise of the
  early frames does not compress, so a GIF's bytes grow with its area (measured on
  Fashion-MNIST trajectories, 40 frames: 16 images 663 KB at scale 1, 3.2 MB at 4;
  100 images 4.0 MB at scale 1, 20 MB at 4). 16 images of 28x28 get scale 4
  (448 px), 100 images keep scale 1 (280 px).
* Writing: every file is written to a temporary file in the same folder, then
  renamed over the target (``os.replace``), so an interrupted write never leaves a
  truncated picture behind.
* GIF timing: ``duration_ms=50`` per frame, ``loop=0`` (forever). The last frame is
  held for ``K // 3`` extra frames as in the article. GIF stores delays in
  hundredths of a second, so ``duration_ms`` must be a multiple of 10. Pillow
  (imageio's GIF writer) merges identical consecutive frames into one frame whose
  delay is the sum; so the hold is stored as one long last frame, reading back
  fewer frames than :func:`gif_frames` returns but showing the same animation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import einops
import numpy as np

__all__ = [
    "DISPLAY_MODES",
    "MIN_IMAGE_PX",
    "MAX_GIF_PX",
    "default_scale",
    "default_gif_scale",
    "upscale",
    "atomic_write",
    "grid_layout",
    "to_uint8",
    "make_grid",
    "save_grid",
    "gif_frames",
    "save_gif",
    "forward_figure",
    "save_forward",
]

DISPLAY_MODES = ("clip", "minmax")
"""How float images become pixels: 'clip' to [-1, 1], or per-image 'minmax'."""

_BACKGROUND = 0  # empty grid cells, and constant images under 'minmax'

MIN_IMAGE_PX = 112
"""The default :func:`default_scale` enlarges each image until its larger side is at least this."""


# --------------------------------------------------------------------------- size


def default_scale(height: int, width: int, min_px: int = MIN_IMAGE_PX) -> int:
    """The smallest integer ``s >= 1`` with ``s * max(height, width) >= min_px`` (28x28 -> 4)."""
    return max(1, -(-int(min_px) // max(int(height), int(width), 1)))


MAX_GIF_PX = 480
"""The default GIF scale keeps a frame's larger side within this (see the module notes)."""


def default_gif_scale(n: int, height: int, width: int) -> int:
    """:func:`default_scale`, lowered until a frame of ``n`` tiled images fits ``MAX_GIF_PX`` (at least 1)."""
    rows, cols = grid_layout(n)
    side = max(rows * int(height), cols * int(width), 1)
    return max(1, min(default_scale(height, width), MAX_GIF_PX // side))


def _resolve_scale(scale, height: int, width: int) -> int:
    if scale is None:
        return default_scale(height, width)
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a whole number >= 1 (or None for the default), got {scale!r}")
    return int(scale)


def upscale(images, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of ``(..., H, W, C)`` images: ``(..., scale*H, scale*W, C)``."""
    images = np.asarray(images)
    if scale == 1:
        return images
    return np.repeat(np.repeat(images, scale, axis=-3), scale, axis=-2)


def atomic_write(path, write) -> Path:
    """Calls ``write(tmp)`` with a temporary path in ``path``'s folder, then renames it to ``path``.

    An interrupted or failed write (an exception, Ctrl-C) removes the temporary file and
    leaves ``path`` as it was: never a truncated file. Parent folders are created.
    Returns ``path`` as a Path.
    """
    path = _prepare_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


# --------------------------------------------------------------------------- layout


def grid_layout(n: int) -> tuple[int, int]:
    """Near-square grid for ``n >= 1`` images: ``rows = isqrt(n)``, ``cols = ceil(n / rows)``.

    ``rows * cols >= n`` always, ``rows <= cols``, and fewer than ``rows`` cells
    stay empty. E.g. 10 -> (3, 4), 16 -> (4, 4), 100 -> (10, 10).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"grid_layout needs a whole number of images >= 1, got {n!r}")
    n = int(n)
    rows = math.isqrt(n)
    cols = -(-n // rows)
    return rows, cols


# ------------------------------------------------------------------------- to pixels


def _check_nhwc(images: np.ndarray, what: str = "images") -> None:
    if images.ndim != 4:
        raise ValueError(
            f"{what} must be NHWC (N, H, W, C), got an array of shape {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (shape {images.shape})")


def to_uint8(images, display: str = "clip") -> np.ndarray:
    """Float NHWC images -> uint8 NHWC pixels, same shape ``(N, H, W, C)``.

    display='clip': clip to [-1, 1], then ``round((x + 1) / 2 * 255)``
      (-1 -> 0, 0 -> 128, 1 -> 255; half up).
    display='minmax': per image (over H, W and C), ``(x - min) / (max - min) * 255``
      rounded, so each image's min is 0 and max is 255 independently of the
      other images (the article's GIF normalisation). A constant image becomes 0.

    A uint8 array is returned unchanged whatever ``display`` is (after checking it).
    Raises ValueError for an unknown ``display``, a non-NHWC shape or non-finite
    values, TypeError for integer/bool/complex input other than uint8.
    """
    if display not in DISPLAY_MODES:
        raise ValueError(
            f"unknown display {display!r}: choose 'clip' (clip to [-1, 1]) or "
            f"'minmax' (stretch each image to [0, 255])"
        )
    images = np.asarray(images)
    _check_nhwc(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind in "biuc":
        raise TypeError(
            f"images must be float in [-1, 1] or uint8, got dtype {images.dtype}"
        )
    x = images.astype(np.float64)  # also handles float16 / bfloat16
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise ValueError(
            f"images contain {bad} non-finite value(s) (NaN or inf); "
            "the model or sampler has probably diverged"
        )
    if display == "clip":
        v = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
    else:  # minmax, per image
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        span = x.max(axis=(1, 2, 3), keepdims=True) - lo
        flat = span == 0
        # (x - lo) / span is exactly 1.0 at the max, so the max maps to exactly 255.
        v = (x - lo) / np.where(flat, 1.0, span) * 255.0
        v = np.where(flat, float(_BACKGROUND), v)
    return np.floor(v + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------- grids


def make_grid(images, pad: int = 2, pad_value: int = 255, cols: int | None = None) -> np.ndarray:
    """Tile ``(N, H, W, C)`` uint8 images into one ``(H', W', C)`` uint8 picture.

    Layout :func:`grid_layout` (``rows, cols``), or ``cols`` columns and
    ``ceil(N / cols)`` rows when given (e.g. one row per class), row-major: image ``i`` is at
    row ``i // cols``, column ``i % cols``. Cells past N are black (0).
    ``pad`` pixels of ``pad_value`` go *between* cells (no outer border), so
    ``H' = rows * H + (rows - 1) * pad`` and ``W' = cols * W + (cols - 1) * pad``.
    With ``pad=0`` this is the article's GIF tiling
    ``"(b1 b2) h w c -> (b1 h) (b2 w) c"``.
    """
    images = np.asarray(images)
    _check_nhwc(images)
    if images.dtype != np.uint8:
        raise TypeError(
            f"make_grid takes uint8 images (use to_uint8 first), got dtype {images.dtype}"
        )
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be a whole number >= 0, got {pad!r}")
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"pad_value must be in [0, 255], got {pad_value!r}")
    n, h, w, c = images.shape
    if cols is None:
        rows, cols = grid_layout(n)
    elif isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1:
        raise ValueError(f"cols must be a whole number >= 1, got {cols!r}")
    else:
        rows = -(-n // cols)
    cells = np.full((rows * cols, h, w, c), _BACKGROUND, dtype=np.uint8)
    cells[:n] = images
    if pad:
        cells = np.pad(
            cells,
            ((0, 0), (0, pad), (0, pad), (0, 0)),
            mode="constant",
            constant_values=np.uint8(pad_value),
        )
    grid = einops.rearrange(cells, "(r k) h w c -> (r h) (k w) c", r=rows, k=cols)
    if pad:
        grid = grid[:-pad, :-pad]
    return np.ascontiguousarray(grid)


def _for_writer(picture: np.ndarray) -> np.ndarray:
    """(..., H, W, C) -> 2-D grayscale for C == 1, unchanged for RGB / RGBA."""
    c = picture.shape[-1]
    if c == 1:
        return picture[..., 0]
    if c in (3, 4):
        return picture
    raise ValueError(f"can only write 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {c}")


def _prepare_path(path) -> Path:
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_grid(
    path,
    images,
    display: str = "clip",
    pad: int = 2,
    pad_value: int = 255,
    cols: int | None = None,
    scale: int | None = None,
) -> Path:
    """Write ``(N, H, W, C)`` images as one PNG grid (:func:`make_grid`); returns the path.

    Float images go through :func:`to_uint8` with ``display``; uint8 images are
    written as they are. Each image is enlarged ``scale`` times (nearest neighbour;
    default :func:`default_scale`, ``scale=1``: their own size) before tiling.
    1 channel -> 2-D grayscale PNG, 3 -> RGB, 4 -> RGBA. PNG data is written
    whatever the file's suffix; parent folders are created; the write is atomic.
    """
    pixels = to_uint8(images, display)
    pixels = upscale(pixels, _resolve_scale(scale, *pixels.shape[1:3]))
    picture = _for_writer(make_grid(pixels, pad=pad, pad_value=pad_value, cols=cols))
    import imageio.v3 as iio  # lazy: imageio takes ~0.2 s to import

    return atomic_write(path, lambda tmp: iio.imwrite(tmp, picture, extension=".png"))


# ----------------------------------------------------------------------------- GIFs


def gif_frames(
    frames, display: str = "minmax", pad: int = 0, hold: int | None = None, scale: int | None = None
) -> np.ndarray:
    """Reverse-process trajectory ``(K, N, H, W, C)`` -> uint8 GIF frames.

    Each of the K recorded frames is tiled as a near-square grid (:func:`make_grid`,
    no separator by default) after :func:`to_uint8` (per-image min-max by default,
    like the article). The last frame is then repeated ``hold`` more times
    (default ``K // 3``, the article's ``frames_per_gif // 3``), so
    ``F = K + hold``. Each image is enlarged ``scale`` times first (nearest
    neighbour; default :func:`default_gif_scale`; ``scale=1``: unchanged). Returns
    ``(F, H', W')`` for 1 channel, ``(F, H', W', C)`` otherwise, with
    ``H' = rows * scale * H + (rows - 1) * pad`` etc.
    """
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[0] == 0:
        raise ValueError(
            f"frames must be a trajectory (K, N, H, W, C) with K >= 1, got shape {frames.shape}"
        )
    k = frames.shape[0]
    if hold is None:
        hold = k // 3
    if isinstance(hold, bool) or not isinstance(hold, (int, np.integer)) or hold < 0:
        raise ValueError(f"hold must be a whole number >= 0, got {hold!r}")
    if scale is None and frames.shape[1] >= 1:
        scale = default_gif_scale(frames.shape[1], *frames.shape[2:4])
    scale = _resolve_scale(scale, *frames.shape[2:4])
    # One recorded frame at a time keeps the float64 working copy small.
    tiled = np.stack(
        [make_grid(upscale(to_uint8(f, display), scale), pad=pad, pad_value=255) for f in frames]
    )
    if hold:
        tiled = np.concatenate([tiled, np.repeat(tiled[-1:], hold, axis=0)])
    if tiled.shape[-1] == 1:
        tiled = tiled[..., 0]
    return tiled


def save_gif(
    path,
    frames,
    display: str = "minmax",
    duration_ms: int = 50,
    pad: int = 0,
    hold: int | None = None,
    scale: int | None = None,
) -> Path:
    """Write a trajectory ``(K, N, H, W, C)`` as a looping GIF (:func:`gif_frames`); returns the path.

    ``duration_ms`` is the delay of every frame in milliseconds (GIF stores
    hundredths of a second, so it must be a positive multiple of 10; note that
    browsers slow delays under 20 ms down). ``loop=0`` loops forever. Identical
    consecutive frames (the held last frame) are merged by the writer into one
    frame with the summed delay. Grayscale is lossless; RGB is quantised to a
    256-colour palette per frame. ``scale`` as in :func:`gif_frames`. Parent
    folders are created; the write is atomic.
    """
    if (
        isinstance(duration_ms, bool)
        or not isinstance(duration_ms, (int, np.integer))
        or duration_ms <= 0
        or duration_ms % 10
    ):
        raise ValueError(
            f"duration_ms must be a positive multiple of 10 (GIF stores 1/100 s), got {duration_ms!r}"
        )
    tiled = gif_frames(frames, display=display, pad=pad, hold=hold, scale=scale)
    if tiled.ndim == 4 and tiled.shape[-1] not in (3, 4):
        raise ValueError(
            f"can only write 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {tiled.shape[-1]}"
        )
    import imageio.v3 as iio  # lazy

    return atomic_write(
        path, lambda tmp: iio.imwrite(tmp, tiled, extension=".gif", duration=int(duration_ms), loop=0)
    )


# ------------------------------------------------------------------- forward process


def forward_figure(
    x0,
    noised: Sequence,
    display: str = "clip",
    pad: int = 2,
    gap: int = 8,
    pad_value: int = 255,
    scale: int | None = None,
) -> np.ndarray:
    """The article's ``show_forward`` as one uint8 picture ``(H', W', C)``.

    ``x0`` is the original batch ``(N, H, W, C)``; ``noised`` is a list of
    already-noised versions of it, each ``(N, H, W, C)`` (in the article: the
    levels 25/50/75/100 % of T, i.e. timesteps ``int(p * T) - 1``), or one array
    ``(L, N, H, W, C)``. Each batch becomes a grid (:func:`make_grid`); the grids
    are stacked top to bottom, originals first, separated by ``gap`` rows of
    ``pad_value``. So ``H' = (L + 1) * Hg + L * gap`` with ``Hg`` a grid's height.
    ``display`` defaults to 'clip' because noised images leave [-1, 1]. Each image
    is enlarged ``scale`` times (nearest neighbour; default :func:`default_scale`).
    """
    if isinstance(gap, bool) or not isinstance(gap, (int, np.integer)) or gap < 0:
        raise ValueError(f"gap must be a whole number >= 0, got {gap!r}")
    x0 = np.asarray(x0)
    _check_nhwc(x0, "x0")
    batches = [x0]
    for i, b in enumerate(noised):
        b = np.asarray(b)
        if b.shape != x0.shape:
            raise ValueError(
                f"noised[{i}] has shape {b.shape}, expected the shape of x0 {x0.shape}"
            )
        batches.append(b)
    scale = _resolve_scale(scale, *x0.shape[1:3])
    grids = [make_grid(upscale(to_uint8(b, display), scale), pad=pad, pad_value=pad_value) for b in batches]
    wg, c = grids[0].shape[1:]
    sep = np.full((gap, wg, c), pad_value, dtype=np.uint8)
    parts = [grids[0]]
    for g in grids[1:]:
        parts += [sep, g]
    return np.concatenate(parts, axis=0)


def save_forward(
    path,
    x0,
    noised: Sequence,
    display: str = "clip",
    pad: int = 2,
    gap: int = 8,
    pad_value: int = 255,
    scale: int | None = None,
) -> Path:
    """Write :func:`forward_figure` as a PNG (grayscale for 1 channel); returns the path.
    The write is atomic."""
    picture = _for_writer(
        forward_figure(x0, noised, display=display, pad=pad, gap=gap, pad_value=pad_value, scale=scale)
    )
    import imageio.v3 as iio  # lazy

    return atomic_write(path, lambda tmp: iio.imwrite(tmp, picture, extension=".png"))


def save_loss_figure(path, curve, bucket_losses, n_steps: int) -> Path:
    """loss.png: the training loss against the step (curve: [(step, loss), ...], log scale) beside
    the loss per equal part of [0, n_steps) (bucket_losses: (K,)). The write is atomic."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if curve:
        steps, losses = zip(*curve)
        left.plot(steps, losses)
        left.set_yscale("log")
    left.set(xlabel="step", ylabel="loss", title="training loss")
    k = len(bucket_losses)
    width = n_steps / k
    right.bar(np.arange(k) * width + width / 2, bucket_losses, width=0.9 * width)
    right.set(xlabel="t", ylabel="loss (final weights)", title="loss per t-bucket")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    finally:
        plt.close(fig)
