"""Tests of ddpm_jax.data: pixel ranges, tfds loading under mock_data, every user error.

The real-data tests run only when DDPM_JAX_DATA_DIR names a folder holding
fashion_mnist/ (the official .gz archives): see conftest.real_fashion.
"""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import data
from ddpm_jax.errors import UserError

ARCHIVES = [
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
]


# --------------------------------------------------------------------------- pixels


def test_to_model_range_golden_values():
    x = data.to_model_range(np.array([0, 1, 128, 254, 255], np.uint8))
    assert x.dtype == jnp.float32
    assert float(x[0]) == -1.0 and float(x[-1]) == 1.0
    # Bit for bit the article's float32 arithmetic, for all 256 values, eager and under jit.
    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    expected = (u.astype(np.float32) / np.float32(255) - np.float32(0.5)) * np.float32(2)
    np.testing.assert_array_equal(np.asarray(data.to_model_range(u)), expected)
    y = jax.jit(data.to_model_range)(jnp.asarray(u))
    assert y.shape == (4, 8, 8, 1) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), expected)
    with pytest.raises(TypeError, match="uint8"):
        data.to_model_range(np.zeros((1, 2, 2, 1), np.float32))


def test_model_range_round_trip_is_exact_for_all_256_values():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    back = data.from_model_range(data.to_model_range(u))
    assert isinstance(back, np.ndarray) and back.dtype == np.uint8 and back.shape == u.shape
    np.testing.assert_array_equal(back, u)


def test_from_model_range_golden_values_and_clipping():
    x = np.array([-1.0, 0.0, 1.0, -3.0, 1.5, -0.5, 0.5], np.float32)  # 0.0 -> 127.5 -> 128 (half up)
    np.testing.assert_array_equal(data.from_model_range(x), [0, 128, 255, 0, 255, 64, 191])
    np.testing.assert_array_equal(data.from_model_range(jnp.asarray([-1.0, 1.0])), [0, 255])
    with pytest.raises(ValueError, match="outside"):
        data.from_model_range(np.array([0.0, 1.5]), clip=False)
    np.testing.assert_array_equal(data.from_model_range(np.array([-1.0, 1.0]), clip=False), [0, 255])
    with pytest.raises(ValueError, match="non-finite"):
        data.from_model_range(np.array([0.0, np.nan]))


# --------------------------------------------------------------------------- names


def test_import_does_not_load_tensorflow():
    code = "import sys, ddpm_jax.data; print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_dataset_name_is_one_line_with_tfds_suggestion(tmp_path):
    for call in (lambda: data.load_split("cifar_10", data_dir=str(tmp_path)), lambda: data.class_names("cifar_10")):
        message = _one_line_error(call)
        assert message.startswith("unknown dataset 'cifar_10' (did you mean 'cifar10'?)")
        assert "tfds dataset name" in message and "'folder'" in message
    assert "did you mean" not in _one_line_error(lambda: data.class_names("no_such_dataset_xyz"))
    assert list(tmp_path.iterdir()) == []


def test_dataset_without_image_feature_is_refused_before_any_download(tmp_path, monkeypatch):
    def must_not_be_called(*args, **kwargs):
        raise AssertionError("a dataset without images must be refused before preparing it")

    monkeypatch.setattr(data, "_prepare", must_not_be_called)
    for call in (lambda: data.load_split("imdb_reviews", data_dir=str(tmp_path)),
                 lambda: data.class_names("imdb_reviews")):
        assert _one_line_error(call).startswith("imdb_reviews has no image feature (it has text, label)")
    assert list(tmp_path.iterdir()) == []


def test_manual_download_dataset_without_manual_dir(tmp_path):
    message = _one_line_error(lambda: data.load_split("imagenet2012", data_dir=str(tmp_path)))
    assert "tfds cannot download it" in message and "--config.data.manual_dir=" in message


@pytest.mark.parametrize("options, fragment", [
    ({"channels": 2}, "--config.data.channels must be 0"),
    ({"image_size": -1}, "--config.data.image_size must be 0"),
])
def test_bad_image_options(options, fragment):
    assert fragment in _one_line_error(lambda: data.load_split("mnist", **options))


def test_class_names():
    assert data.class_names("fashion_mnist") == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]
    assert data.class_names("mnist") == [str(i) for i in range(10)]


# --------------------------------------------------------------------------- mock_data


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_load_split_under_mock_data(name, tmp_path, monkeypatch):
    def must_not_be_called(*args, **kwargs):
        raise AssertionError("mock_data must be read directly, without probing or preparing")

    monkeypatch.setattr(data, "_check_reachable", must_not_be_called)
    monkeypatch.setattr(data, "_prepare", must_not_be_called)
    with tfds.testing.mock_data(num_examples=64):
        images, labels = data.load_split(name, data_dir=str(tmp_path))
    assert images.shape == (64, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (64,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10
    assert list(tmp_path.iterdir()) == []


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_any_tfds_image_dataset_under_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=6):  # the mock's records are the same on every read
        images, labels = data.load_split("cifar10", data_dir=str(tmp_path))
        small, small_labels = data.load_split("cifar10", data_dir=str(tmp_path), image_size=16)
        gray, _ = data.load_split("cifar10", data_dir=str(tmp_path), channels=1)
        mnist_rgb, _ = data.load_split("mnist", data_dir=str(tmp_path), channels=3)
        mnist, _ = data.load_split("mnist", data_dir=str(tmp_path))
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
    assert small.shape == (6, 16, 16, 3) and small.dtype == np.uint8
    np.testing.assert_array_equal(small_labels, labels)
    # A square image is only resized: PIL's antialiased bicubic, the whole image.
    np.testing.assert_array_equal(small[0], np.asarray(Image.fromarray(images[0]).resize((16, 16), Image.BICUBIC)))
    assert gray.shape == (6, 32, 32, 1) and gray.dtype == np.uint8
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    assert np.abs(gray[..., 0] - luma).max() <= 1
    assert mnist_rgb.shape == (6, 28, 28, 3)
    for c in range(3):
        np.testing.assert_array_equal(mnist_rgb[..., c:c + 1], mnist)


def test_images_of_varying_size_and_datasets_without_labels(tmp_path):
    with tfds.testing.mock_data(num_examples=5):  # oxford_flowers102's mock images differ in size
        message = _one_line_error(lambda: data.load_split("oxford_flowers102", data_dir=str(tmp_path)))
        flowers, flower_labels = data.load_split("oxford_flowers102", data_dir=str(tmp_path), image_size=12)
        faces, face_labels = data.load_split("celeb_a", data_dir=str(tmp_path), image_size=8, channels=1)
    assert "the images of oxford_flowers102 'train' differ in size (example 0 is" in message
    assert "set --config.data.image_size=N" in message
    assert flowers.shape == (5, 12, 12, 3) and flower_labels.max() < 102
    assert faces.shape == (5, 8, 8, 1) and faces.dtype == np.uint8  # celeb_a: no supervised keys
    np.testing.assert_array_equal(face_labels, np.zeros(5, np.int32))
    assert data.class_names("celeb_a") == []
    assert data.class_names("oxford_flowers102")[:2] == ["pink primrose", "hard-leaved pocket orchid"]


def test_class_names_of_a_prepared_dataset_come_from_its_data_dir(tmp_path):
    # cifar10's names are read from its archive when tfds prepares it; what preparing leaves in
    # data_dir (dataset_info.json, label.labels.txt) is written here directly.
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    builder.info.features["label"].names = CIFAR10
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    assert data.class_names("cifar10", data_dir=str(tmp_path)) == CIFAR10
    assert data.label_index("Truck", "cifar10", data_dir=str(tmp_path)) == 9
    assert data.class_names("cifar10") == [str(i) for i in range(10)]  # tfds' placeholders before that


def test_data_prepared_as_tfrecord(tmp_path):
    # tfds' default format (data prepared elsewhere): read with as_dataset, one example at a time.
    tfds.testing.DummyMnist(data_dir=str(tmp_path)).download_and_prepare()  # 20 train, 20 test examples
    images, labels = data.load_split("dummy_mnist", data_dir=str(tmp_path))
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.zeros(20, np.int32))  # no supervised keys: no labels
    few, _ = data.load_split("dummy_mnist", "test[:5]", data_dir=str(tmp_path), image_size=14, channels=3)
    assert few.shape == (5, 14, 14, 3) and few.dtype == np.uint8
    message = _one_line_error(lambda: data.load_split("dummy_mnist", "valid", data_dir=str(tmp_path)))
    assert message.startswith("cannot read split 'valid' of dummy_mnist: Unknown split 'valid'")


# --------------------------------------------------------------------------- not prepared


def _closed_port() -> int:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_not_prepared_without_network_fails_fast(tmp_path, monkeypatch):
    # No network, for certain: every request goes through a proxy that refuses connections
    # (requests, tfds' HTTP client, honours these variables).
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, proxy)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    data_dir = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        data.load_split("fashion_mnist", data_dir=str(data_dir))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert f"not prepared in {data_dir}" in message and "--config.data.manual_dir=" in message
    assert ", ".join(ARCHIVES) in message
    assert not data_dir.exists()  # nothing was written


class _NotFoundProxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy that answers 404 to everything; counts the GETs (tfds' downloads)."""

    gets = 0

    def do_HEAD(self):
        self.send_response(404)
        self.end_headers()

    def do_GET(self):
        type(self).gets += 1
        self.do_HEAD()

    def log_message(self, *args):
        pass


def test_a_download_that_fails_is_one_line(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _NotFoundProxy.gets = 0
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")  # fashion_mnist's URLs
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        with pytest.raises(UserError, match=r"cannot download fashion_mnist: .*HTTP code: 404.*manual_dir") as info:
            data.load_split("fashion_mnist", data_dir=str(tmp_path / "tfds"))
        assert "\n" not in str(info.value)
    finally:
        # tfds raises at the first failed archive while its pool still downloads the others.
        # Answer those too before closing: a download left without its proxy retries with
        # back-off in a pool thread, and interpreter exit waits for it (CI hung here).
        deadline = time.monotonic() + 30
        while _NotFoundProxy.gets < len(ARCHIVES) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.shutdown()
        server.server_close()


def test_manual_dir_missing_files(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(UserError) as info:
        data.load_split("fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    message = str(info.value)
    assert f"manual_dir {manual}: missing {', '.join(ARCHIVES)} for fashion_mnist;" in message
    # A per-dataset subfolder holding some of them: the rest are named.
    (manual / "fashion_mnist").mkdir()
    for f in ARCHIVES[:3]:
        (manual / "fashion_mnist" / f).write_bytes(b"x")
    with pytest.raises(UserError, match=r"manual_dir \S+/fashion_mnist: missing train-labels-idx1-ubyte.gz for"):
        data.load_split("fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    with pytest.raises(UserError, match="does not exist"):
        data.load_split("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "nowhere"))


def test_manual_dir_with_corrupt_archives(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for f in ARCHIVES:
        (manual / f).write_bytes(b"not the official archive")
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserError) as info:
        data.load_split("mnist", data_dir=str(data_dir), manual_dir=str(manual))
    message = str(info.value)
    assert "\n" not in message and "does not match the checksum tfds registers for mnist" in message
    assert any(f"{manual / f} does not match" in message for f in ARCHIVES)  # tfds stops at the first
    assert "re-download it from https://" in message
    # Nothing half-prepared is left behind: no variant folder, no incomplete.* folder.
    assert not tfds.builder("mnist", data_dir=str(data_dir)).is_prepared()
    assert [p.name for p in (data_dir / "mnist").iterdir()] == []


# --------------------------------------------------------------------------- folders

RED, GREEN, BLUE = (255, 0, 0), (0, 160, 0), (0, 0, 255)


def _save(image: Image.Image, path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _bands(width: int, height: int, along: int) -> np.ndarray:
    """uint8 (height, width, 3): red, green, blue in 1/4, 1/2, 1/4 of the image along axis `along`."""
    pixels = np.empty((height, width, 3), np.uint8)
    n = pixels.shape[along]
    for colour, start, stop in ((RED, 0, n // 4), (GREEN, n // 4, n - n // 4), (BLUE, n - n // 4, n)):
        pixels[(slice(None),) * along + (slice(start, stop),)] = colour
    return pixels


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """classes/: colour images of mixed modes and sizes in two class subfolders; gray/: 8x8 grayscale
    images of every gray mode, flat; crop/: images whose centre differs from their sides."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    noise = lambda h, w, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()
    classes = root / "classes"
    _save(Image.fromarray(noise(10, 20)), classes / "cats" / "a_wide.png")
    _save(Image.fromarray(noise(12, 12)), classes / "cats" / "b.jpg", quality=95)
    _save(Image.fromarray(noise(9, 9)).convert("P"), classes / "cats" / "c_palette.gif")
    _save(Image.fromarray(noise(16, 8, 1)), classes / "dogs" / "d_gray_tall.png")
    _save(Image.fromarray(noise(10, 10, 4)), classes / "dogs" / "e_rgba.PNG")  # extensions in any case
    _save(Image.fromarray(noise(12, 12, 1).astype(np.uint16) * 257), classes / "dogs" / "deep" / "f_16bit.png")
    (classes / "dogs" / ".hidden.png").write_bytes(b"not an image: hidden files are skipped")
    (classes / "dogs" / "notes.txt").write_text("not an image file")

    gray = root / "gray"
    gray_pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    la = np.stack([gray_pixels, np.full((8, 8), 255, np.uint8)], -1)
    la[0, 0] = (0, 0)  # fully transparent black: white on the page
    _save(Image.fromarray(gray_pixels), gray / "1_l.png")
    _save(Image.fromarray(la, "LA"), gray / "2_la.png")
    _save(Image.fromarray(gray_pixels).convert("P"), gray / "3_gray_palette.png")
    _save(Image.fromarray(np.eye(8, dtype=bool)), gray / "4_bilevel.bmp")
    _save(Image.fromarray(np.array([0, 1000, 32896, 65535] * 16, np.uint16).reshape(8, 8)), gray / "5_16bit.png")

    crop = root / "crop"
    _save(Image.fromarray(_bands(48, 16, along=1)), crop / "wide.png")  # red | green | blue, left to right
    _save(Image.fromarray(_bands(16, 48, along=0)), crop / "tall.png")  # top to bottom
    _save(Image.fromarray(noise(16, 48)), crop / "wide_noise.png")
    return root


def test_folder_of_mixed_images(folders):
    images, labels = data.load_split("folder", path=str(folders / "classes"), image_size=8)
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8  # a colour image anywhere: RGB
    assert labels.dtype == np.int32
    # Sorted paths, a folder's images together: cats/a, b, c; dogs/d, deep/f, e.
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    assert data.class_names("folder", str(folders / "classes")) == ["cats", "dogs"]
    assert data.label_index("Dogs", "folder", str(folders / "classes")) == 1
    for index in (3, 4):  # the grayscale images (tall, 16-bit) were repeated into RGB
        np.testing.assert_array_equal(images[index, ..., 0], images[index, ..., 2])
    gray, _ = data.load_split("folder", path=str(folders / "classes"), image_size=8, channels=1)
    assert gray.shape == (6, 8, 8, 1)


def test_folder_of_grayscale_images(folders):
    path = str(folders / "gray")
    images, labels = data.load_split("folder", path=path)  # all 8x8: no resizing needed
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8  # every mode is gray: one channel
    np.testing.assert_array_equal(labels, np.zeros(5, np.int32))  # images at the top level: no classes
    assert data.class_names("folder", path) == []
    with pytest.raises(UserError, match="has no class labels"):
        data.label_index("0", "folder", path)
    gray_pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    np.testing.assert_array_equal(images[0, ..., 0], gray_pixels)
    expected_la = gray_pixels.copy()
    expected_la[0, 0] = 255  # alpha composited on white
    np.testing.assert_array_equal(images[1, ..., 0], expected_la)
    np.testing.assert_array_equal(images[2, ..., 0], gray_pixels)
    np.testing.assert_array_equal(images[3, ..., 0], np.eye(8, dtype=np.uint8) * 255)
    np.testing.assert_array_equal(images[4, ..., 0], np.array([0, 4, 128, 255] * 16).reshape(8, 8))  # v / 257
    rgb, _ = data.load_split("folder", path=path, channels=3)
    assert rgb.shape == (5, 8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c:c + 1], images)


def test_folder_alpha_is_composited_on_white(tmp_path):
    rgba = np.array([[[0, 0, 0, 0], [255, 0, 0, 255]], [[0, 0, 255, 128], [10, 20, 30, 255]]], np.uint8)
    _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    images, _ = data.load_split("folder", path=str(tmp_path))
    np.testing.assert_array_equal(images[0], [[[255, 255, 255], [255, 0, 0]], [[127, 127, 255], [10, 20, 30]]])


def test_folder_centre_crop(folders):
    images, _ = data.load_split("folder", path=str(folders / "crop"), image_size=8)
    assert images.shape == (3, 8, 8, 3)  # tall.png, wide.png, wide_noise.png
    for index in (0, 1):  # only the green centre is left, halved with no colour from the sides
        assert (images[index] == GREEN).all()
    # The same as resizing the shorter side to 8 (48x16 -> 24x8) and cropping the centre 8 columns.
    noise = np.asarray(Image.open(folders / "crop" / "wide_noise.png"))
    resized = np.asarray(Image.fromarray(noise).resize((24, 8), Image.BICUBIC))
    np.testing.assert_array_equal(images[2], resized[:, 8:16])


def test_load_config_split_reads_config_data(folders):
    from ddpm_jax.config import base_config

    config = base_config()
    config.data.name, config.data.path, config.data.image_size = "folder", str(folders / "classes"), 8
    config.data.channels = 1
    images, labels = data.load_config_split(config.data)
    expected_images, expected_labels = data.load_split("folder", path=str(folders / "classes"), image_size=8,
                                                       channels=1)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def test_folder_errors(folders, tmp_path):
    def message(path, **kwargs):
        return _one_line_error(lambda: data.load_split("folder", path=str(path), **kwargs))

    assert "--config.data.path=DIR" in _one_line_error(lambda: data.load_split("folder"))
    assert f"{tmp_path / 'nowhere'} does not exist or is not a folder" in message(tmp_path / "nowhere")
    assert "is not a folder" in message(folders / "gray" / "1_l.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert f"no image files (.png, .jpg, .jpeg, .bmp, .gif, .webp) under {tmp_path / 'empty'}" in message(
        tmp_path / "empty")
    assert "differ in size (cats/a_wide.png is 20x10, cats/b.jpg is 12x12)" in message(folders / "classes")
    assert "--config.data.image_size=N" in message(folders / "classes")
    assert "one split, 'train'" in message(folders / "gray", split="test")
    assert "has no class labels" in _one_line_error(lambda: data.label_index("0", "folder", str(folders / "gray")))
    # Unreadable files are named: not an image at all, and a PNG cut short.
    _save(Image.fromarray(np.zeros((8, 8), np.uint8)), tmp_path / "broken" / "a_good.png")
    (tmp_path / "broken" / "b_junk.png").write_bytes(b"this is not a PNG file")
    assert f"cannot read image {tmp_path / 'broken' / 'b_junk.png'} (UnidentifiedImageError" in message(
        tmp_path / "broken")
    (tmp_path / "broken" / "b_junk.png").unlink()
    whole = (folders / "crop" / "wide_noise.png").read_bytes()
    (tmp_path / "broken" / "c_truncated.png").write_bytes(whole[: len(whole) // 2])
    found = message(tmp_path / "broken", image_size=8)
    assert found.startswith(f"cannot read image {tmp_path / 'broken' / 'c_truncated.png'} (")
    assert found.endswith("remove or replace it")


# --------------------------------------------------------------------------- real data

def test_real_fashion_mnist(real_fashion):
    images, labels, test_images, test_labels = (real_fashion.images, real_fashion.labels,
                                                real_fashion.test_images, real_fashion.test_labels)
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int32
    assert abs(images.mean() / 255 - 0.2860) < 0.001
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [6000] * 10)
    # tfds' own (deterministic, hashed) order, not the IDX files' order (9, 0, 0, 3, ...).
    np.testing.assert_array_equal(labels[:10], [2, 1, 8, 4, 1, 9, 2, 2, 0, 2])
    assert test_images.shape == (10000, 28, 28, 1) and test_images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [1000] * 10)
    assert abs(test_images.mean() / 255 - 0.2868) < 0.001


def test_real_mnist_prepared_beside_fashion_mnist_is_mnist(real_fashion):
    """MNIST's archives have Fashion-MNIST's file names; prepared from manual_dir into the same
    data_dir after Fashion-MNIST, they must not be served Fashion-MNIST's extracted files."""
    source = os.path.join(os.path.dirname(real_fashion.archives), "mnist")
    if not os.path.isdir(source):
        pytest.skip("DDPM_JAX_DATA_DIR holds no mnist/ folder")
    images, labels = data.load_split("mnist", data_dir=str(real_fashion.data_dir), manual_dir=source)
    assert images.shape == (60000, 28, 28, 1) and abs(images.mean() / 255 - 0.1307) < 0.001
    np.testing.assert_array_equal(np.bincount(labels, minlength=10)[:3], [5923, 6742, 5958])
