"""Tests for ddpm_jax.viz (numpy + imageio only; fast)."""

import os
import warnings

import einops
import imageio.v3 as iio
import numpy as np
import pytest

from ddpm_jax import viz


def _blocks(n, h=3, w=2, c=1):
    """uint8 batch where image i is filled with the value 10 * (i + 1)."""
    vals = (10 * (np.arange(n) + 1)).astype(np.uint8)
    return np.broadcast_to(vals[:, None, None, None], (n, h, w, c)).copy()


# ------------------------------------------------------------------- grid_layout


@pytest.mark.parametrize(
    "n, expected",
    [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)),
     (10, (3, 4)), (16, (4, 4)), (100, (10, 10)), (17, (4, 5)), (99, (9, 11))],
)
def test_grid_layout(n, expected):
    rows, cols = viz.grid_layout(n)
    assert (rows, cols) == expected
    assert rows * cols >= n and rows * cols - n < rows


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_grid_layout_rejects(bad):
    with pytest.raises(ValueError):
        viz.grid_layout(bad)


# ---------------------------------------------------------------------- to_uint8


def test_to_uint8_clip_golden():
    x = np.array([-1.0, 1.0, 0.0, -3.0, 7.5, 0.5, -0.5], np.float32).reshape(1, 1, 7, 1)
    got = viz.to_uint8(x, "clip")
    assert got.dtype == np.uint8 and got.shape == x.shape
    # 0.5 -> 191.25 -> 191 ; -0.5 -> 63.75 -> 64
    np.testing.assert_array_equal(got.ravel(), [0, 255, 128, 0, 255, 191, 64])


def test_to_uint8_clip_is_default_and_elementwise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5, 2)) * 2
    got = viz.to_uint8(x)
    expected = np.floor((np.clip(x, -1, 1) + 1) * 127.5 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_to_uint8_minmax_per_image():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6, 5, 3)).astype(np.float32)
    x[1] = x[1] * 10 + 40  # a wildly different range must not affect the others
    x[2] *= 0.001
    got = viz.to_uint8(x, "minmax")
    for i in range(4):
        assert got[i].min() == 0 and got[i].max() == 255
        # min and max land exactly where the input's min and max were
        assert got[i].flat[np.argmin(x[i])] == 0
        assert got[i].flat[np.argmax(x[i])] == 255
    # the article's formula, rounded to nearest
    xi = x[0].astype(np.float64)
    ref = np.floor((xi - xi.min()) / (xi.max() - xi.min()) * 255 + 0.5)
    np.testing.assert_array_equal(got[0], ref)
    # independent of the other images in the batch
    np.testing.assert_array_equal(viz.to_uint8(x[3:4], "minmax")[0], got[3])


def test_to_uint8_minmax_golden():
    x = np.array([2.0, 3.0, 4.0, 6.0]).reshape(1, 1, 4, 1)
    # (x - 2) / 4 * 255 = 0, 63.75, 127.5, 255
    np.testing.assert_array_equal(viz.to_uint8(x, "minmax").ravel(), [0, 64, 128, 255])
    # exact half-way values round half up (not to even): x / 510 * 255 = 0.5, 2.5, 4.5
    x = np.array([0.0, 1.0, 5.0, 9.0, 510.0]).reshape(1, 1, 5, 1)
    np.testing.assert_array_equal(viz.to_uint8(x, "minmax").ravel(), [0, 1, 3, 5, 255])


def test_to_uint8_minmax_constant_image_guarded():
    x = np.stack([np.full((3, 3, 1), 0.7), np.linspace(-1, 1, 9).reshape(3, 3, 1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = viz.to_uint8(x, "minmax")
    assert (got[0] == 0).all()
    assert got[1].min() == 0 and got[1].max() == 255


def test_to_uint8_uint8_passthrough():
    u = np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3)
    out = viz.to_uint8(u, "minmax")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, u)


def test_to_uint8_errors():
    x = np.zeros((1, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="unknown display 'foo'"):
        viz.to_uint8(x, "foo")
    with pytest.raises(ValueError, match="NHWC"):
        viz.to_uint8(np.zeros((2, 2, 1)))
    with pytest.raises(TypeError):
        viz.to_uint8(np.zeros((1, 2, 2, 1), np.int32))
    y = x.copy()
    y[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        viz.to_uint8(y)


# --------------------------------------------------------------------- make_grid


@pytest.mark.parametrize("n", [1, 3, 5, 10, 16])
def test_make_grid_placement_no_pad(n):
    h, w = 3, 2
    imgs = _blocks(n, h, w)
    rows, cols = viz.grid_layout(n)
    g = viz.make_grid(imgs, pad=0)
    assert g.shape == (rows * h, cols * w, 1) and g.dtype == np.uint8
    for cell in range(rows * cols):
        r, c = divmod(cell, cols)
        block = g[r * h:(r + 1) * h, c * w:(c + 1) * w]
        expected = 10 * (cell + 1) if cell < n else 0
        assert (block == expected).all(), (cell, block)


def test_make_grid_placement_with_pad():
    n, h, w, pad = 5, 3, 4, 2
    imgs = _blocks(n, h, w, c=3)
    g = viz.make_grid(imgs, pad=pad, pad_value=200)
    rows, cols = 2, 3
    assert g.shape == (rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3)
    for cell in range(rows * cols):
        r, c = divmod(cell, cols)
        y, x = r * (h + pad), c * (w + pad)
        expected = 10 * (cell + 1) if cell < n else 0
        assert (g[y:y + h, x:x + w] == expected).all()
    # separators between cells, no outer border
    assert (g[h:h + pad] == 200).all()
    assert (g[:, w:w + pad] == 200).all()
    assert (g[:, 2 * w + pad:2 * (w + pad)] == 200).all()
    # pixels that are neither cells nor separators: none
    n_cell_pixels = rows * cols * h * w
    n_sep = g.shape[0] * g.shape[1] - n_cell_pixels
    assert (g[..., 0] == 200).sum() == n_sep


def test_make_grid_matches_article_einops_when_divisible():
    rng = np.random.default_rng(2)
    for n in (4, 6, 12, 16):
        imgs = rng.integers(0, 256, (n, 5, 7, 1), dtype=np.uint8)
        b1 = int(n ** 0.5)
        ref = einops.rearrange(imgs, "(b1 b2) h w c -> (b1 h) (b2 w) c", b1=b1)
        np.testing.assert_array_equal(viz.make_grid(imgs, pad=0), ref)


def test_make_grid_rejects_float():
    with pytest.raises(TypeError):
        viz.make_grid(np.zeros((2, 2, 2, 1), np.float32))


# --------------------------------------------------------------------- save_grid


@pytest.mark.parametrize("c", [1, 3])
def test_save_grid_roundtrip(tmp_path, c):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.3, 1.3, size=(5, 6, 7, c)).astype(np.float32)
    path = viz.save_grid(tmp_path / "sub" / "dir" / "grid.png", x, scale=1)
    assert path.exists()
    expected = viz.make_grid(viz.to_uint8(x, "clip"), pad=2)
    back = iio.imread(path)
    if c == 1:
        assert back.ndim == 2
        expected = expected[..., 0]
    else:
        assert back.shape[-1] == 3
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, expected)


def test_save_grid_minmax_and_uint8(tmp_path):
    x = np.stack([np.full((4, 4, 1), 0.3), np.full((4, 4, 1), -0.3)])
    x[0, 0, 0, 0] = 5.0
    x[1, 0, 0, 0] = -5.0
    viz.save_grid(tmp_path / "a.png", x, display="minmax", pad=0, scale=1)
    back = iio.imread(tmp_path / "a.png")
    assert back[0, 0] == 255 and back[1, 1] == 0  # image 0: max at corner
    assert back[0, 4] == 0 and back[1, 5] == 255  # image 1: min at corner
    u = _blocks(2, 4, 4)
    viz.save_grid(tmp_path / "u.png", u, pad=0, scale=1)
    np.testing.assert_array_equal(iio.imread(tmp_path / "u.png"), u[..., 0].transpose(1, 0, 2).reshape(4, 8))


# ----------------------------------------------------------------------- GIFs


def _trajectory(k, n, h=4, w=4, c=1, seed=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, n, h, w, c)).astype(np.float32) * 3


@pytest.mark.parametrize("k", [1, 2, 3, 10, 100])
def test_gif_frames_count_and_hold(k):
    traj = _trajectory(k, 6)
    out = viz.gif_frames(traj, scale=1)
    f = k + k // 3
    assert out.shape == (f, 2 * 4, 3 * 4) and out.dtype == np.uint8
    for i in range(k, f):
        np.testing.assert_array_equal(out[i], out[k - 1])
    # each frame is the min-max-normalised tiling of its recorded frame
    for i in (0, k - 1):
        ref = viz.make_grid(viz.to_uint8(traj[i], "minmax"), pad=0)[..., 0]
        np.testing.assert_array_equal(out[i], ref)


def test_gif_frames_minmax_each_image():
    traj = _trajectory(3, 4)
    traj[:, 2] += 100  # offset one image; per-image normalisation ignores it
    out = viz.gif_frames(traj, scale=1)
    for f in range(3):
        for i in range(4):
            r, c = divmod(i, 2)
            cell = out[f, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]
            assert cell.min() == 0 and cell.max() == 255


def test_gif_frames_rgb_shape():
    out = viz.gif_frames(_trajectory(6, 5, c=3), hold=0, scale=1)
    assert out.shape == (6, 2 * 4, 3 * 4, 3)


def test_gif_frames_rejects_bad_shape():
    with pytest.raises(ValueError):
        viz.gif_frames(np.zeros((3, 4, 4, 1)))


def test_save_gif_roundtrip_gray(tmp_path):
    k, duration = 9, 50
    traj = _trajectory(k, 4)
    path = viz.save_gif(tmp_path / "out" / "s.gif", traj, duration_ms=duration, scale=1)
    expected = viz.gif_frames(traj, scale=1)  # (k + k//3, 8, 8)
    assert expected.shape[0] == 12
    back = iio.imread(path, index=None)
    # the writer merges the held copies into the last frame: k distinct frames
    assert back.shape[:3] == (k, 8, 8)
    gray = back[..., 0] if back.ndim == 4 else back
    np.testing.assert_array_equal(gray, expected[:k])  # grayscale GIF is lossless
    durations = [iio.immeta(path, index=i)["duration"] for i in range(k)]
    assert durations[:-1] == [duration] * (k - 1)
    assert durations[-1] == duration * (1 + k // 3)  # the hold, in ms
    assert sum(durations) == duration * expected.shape[0]
    assert iio.immeta(path)["loop"] == 0


def test_save_gif_rgb_and_duration_units(tmp_path):
    traj = _trajectory(4, 2, c=3)
    # few colours so the 256-colour palette is exact
    traj = np.round(traj).clip(-1, 1)
    path = viz.save_gif(tmp_path / "c.gif", traj, display="clip", duration_ms=120, hold=0, scale=1)
    back = iio.imread(path, index=None)
    expected = viz.gif_frames(traj, display="clip", hold=0, scale=1)
    distinct = [0] + [i for i in range(1, 4) if not np.array_equal(expected[i], expected[i - 1])]
    assert back.shape == (len(distinct), 4, 8, 3)
    np.testing.assert_array_equal(back, expected[distinct])
    assert iio.immeta(path, index=0)["duration"] in (120, 240, 360, 480)


@pytest.mark.parametrize("bad", [0, -10, 45, 2.5])
def test_save_gif_rejects_duration(tmp_path, bad):
    with pytest.raises(ValueError, match="duration_ms"):
        viz.save_gif(tmp_path / "x.gif", _trajectory(2, 1), duration_ms=bad)


# -------------------------------------------------------------- forward figure


def test_forward_figure_layout(tmp_path):
    n, h, w = 5, 3, 3
    x0 = np.full((n, h, w, 1), -1.0)  # black
    levels = [np.full((n, h, w, 1), v) for v in (-0.5, 0.0, 0.5, 3.0)]  # last one clipped
    fig = viz.forward_figure(x0, levels, pad=1, gap=4, pad_value=77, scale=1)
    gh, gw = 2 * h + 1, 3 * w + 2  # 2x3 grid with 1 px separators
    assert fig.shape == (5 * gh + 4 * 4, gw, 1)
    expected_vals = [0, 64, 128, 191, 255]
    for b, val in enumerate(expected_vals):
        top = b * (gh + 4)
        block = fig[top:top + gh]
        np.testing.assert_array_equal(block, viz.make_grid(viz.to_uint8(([x0] + levels)[b]), pad=1, pad_value=77))
        assert block[0, 0, 0] == val  # first image
        assert block[h + 1, 2 * (w + 1), 0] == 0  # the empty 6th cell
        if b < 4:
            assert (fig[top + gh:top + gh + 4] == 77).all()  # gap between blocks

    path = viz.save_forward(tmp_path / "f" / "forward.png", x0, np.stack(levels), pad=1, gap=4, pad_value=77,
                             scale=1)
    np.testing.assert_array_equal(iio.imread(path), fig[..., 0])


def test_forward_figure_shape_mismatch():
    with pytest.raises(ValueError, match=r"noised\[1\]"):
        viz.forward_figure(np.zeros((4, 2, 2, 1)), [np.zeros((4, 2, 2, 1)), np.zeros((3, 2, 2, 1))])


# ------------------------------------------------------------------ size (scale)


def test_default_scale_makes_each_image_at_least_112_px():
    assert viz.default_scale(28, 28) == 4 and viz.default_scale(32, 32) == 4
    assert viz.default_scale(112, 112) == 1 and viz.default_scale(200, 50) == 1 and viz.default_scale(7, 5) == 16
    assert viz.default_gif_scale(16, 28, 28) == 4  # 4 x 4 grid of 112 px images: 448 px
    assert viz.default_gif_scale(100, 28, 28) == 1  # already 280 px: scaling would only multiply the bytes
    assert viz.default_gif_scale(36, 28, 28) == 2


def test_pictures_are_enlarged_by_default_with_nearest_neighbour(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, size=(16, 28, 28, 1)).astype(np.float32)
    grid = iio.imread(viz.save_grid(tmp_path / "g.png", x))
    assert grid.shape == (4 * 112 + 3 * 2, 4 * 112 + 3 * 2)  # was 4 * 28 + 3 * 2 = 118
    np.testing.assert_array_equal(grid[:112, :112], np.repeat(np.repeat(viz.to_uint8(x)[0, ..., 0], 4, 0), 4, 1))
    assert iio.imread(viz.save_grid(tmp_path / "g1.png", x, scale=3)).shape == (4 * 84 + 6, 4 * 84 + 6)
    assert iio.imread(viz.save_grid(tmp_path / "g2.png", x, scale=1)).shape == (118, 118)  # the old size
    frames = viz.gif_frames(x[None], hold=0)
    assert frames.shape == (1, 448, 448)
    np.testing.assert_array_equal(frames[0, ::4, ::4], viz.gif_frames(x[None], hold=0, scale=1)[0])
    fig = viz.forward_figure(x[:2], [x[2:4]], gap=8)
    assert fig.shape == (2 * 112 + 8, 2 * 112 + 2, 1)
    with pytest.raises(ValueError, match="scale"):
        viz.save_grid(tmp_path / "bad.png", x, scale=0)


@pytest.mark.parametrize("what", ["grid", "gif", "forward"])
def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch, what):
    """A write cut short (here: the writer raises after writing part of the file) leaves no
    truncated file at the target, no temporary file, and an existing target untouched."""
    import imageio.v3 as real_iio

    def broken_imwrite(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"GIF89a-half-written")
        raise KeyboardInterrupt

    x = np.zeros((4, 6, 6, 1), np.float32)
    save = {"grid": lambda p: viz.save_grid(p, x), "gif": lambda p: viz.save_gif(p, x[None]),
            "forward": lambda p: viz.save_forward(p, x, [x])}[what]
    target = tmp_path / "out" / "picture"
    monkeypatch.setattr(real_iio, "imwrite", broken_imwrite)
    with pytest.raises(KeyboardInterrupt):
        save(target)
    assert os.listdir(tmp_path / "out") == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        save(target)
    assert os.listdir(tmp_path / "out") == ["picture"] and target.read_bytes() == b"old"
    monkeypatch.undo()
    save(target)  # a complete write replaces it
    assert os.listdir(tmp_path / "out") == ["picture"] and target.read_bytes() != b"old"


def test_import_is_light():
    """viz itself pulls in neither jax nor imageio (imageio is imported lazily)."""
    import subprocess
    import sys

    code = (
        "import sys, ddpm_jax; before = set(sys.modules); import ddpm_jax.viz; "
        "new = set(sys.modules) - before; "
        "print(any(m.split('.')[0] in ('jax', 'imageio') for m in new))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
