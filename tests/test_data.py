"""Tests of ddpm_jax.data: pixel ranges, tfds loading under mock_data, every user error.

The real-data test runs only when DDPM_JAX_DATA_DIR names a folder holding
fashion_mnist/ (the official .gz archives); it prepares Fashion-MNIST into a temp
data_dir (~40 s on 2 slow cores).
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


def test_unknown_dataset_name_lists_supported_names(tmp_path):
    for call in (lambda: data.load_split("cifar10", data_dir=str(tmp_path)), lambda: data.class_names("cifar10")):
        with pytest.raises(UserError, match="cifar10.*fashion_mnist, mnist"):
            call()
    assert list(tmp_path.iterdir()) == []


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


# --------------------------------------------------------------------------- real data

REAL_DATA = os.environ.get("DDPM_JAX_DATA_DIR", "")


@pytest.fixture(scope="module")
def fashion_train(tmp_path_factory):
    if not REAL_DATA:
        pytest.skip("set DDPM_JAX_DATA_DIR to a folder holding fashion_mnist/ with the official archives")
    source = os.path.join(os.path.expanduser(REAL_DATA), "fashion_mnist")
    return _prepare_fashion(source, tmp_path_factory.mktemp("fashion"))


def _prepare_fashion(source, tmp):
    data_dir = tmp / "tfds"
    # 1) A failed attempt into the same data_dir: good labels, a truncated image archive,
    #    found through the <manual_dir>/<name>/ layout.
    bad = tmp / "bad_manual" / "fashion_mnist"
    bad.mkdir(parents=True)
    for f in ARCHIVES:
        payload = open(os.path.join(source, f), "rb").read()
        (bad / f).write_bytes(payload[:1000] if f == "train-images-idx3-ubyte.gz" else payload)
    with pytest.raises(UserError, match=r"fashion_mnist/train-images-idx3-ubyte.gz does not match the checksum"):
        data.load_split("fashion_mnist", data_dir=str(data_dir), manual_dir=str(bad.parent))
    # 2) What a killed earlier preparation leaves behind must not get in the way.
    (data_dir / "fashion_mnist" / "incomplete.KILLED_3.0.1").mkdir(parents=True)
    (data_dir / "fashion_mnist" / "incomplete.KILLED_3.0.1" / "junk").write_bytes(b"junk")
    # 3) The real preparation, then a read of the prepared data without manual_dir.
    start = time.monotonic()
    images, labels = data.load_split("fashion_mnist", data_dir=str(data_dir), manual_dir=source)
    prepare_and_load_s = time.monotonic() - start
    start = time.monotonic()
    test_images, test_labels = data.load_split("fashion_mnist", "test", data_dir=str(data_dir))
    load_test_s = time.monotonic() - start
    print(f"\nfashion_mnist: prepare+load train {prepare_and_load_s:.1f} s, load test {load_test_s:.1f} s")
    with pytest.raises(UserError, match="cannot read split 'valid' of fashion_mnist: Unknown split 'valid'"):
        data.load_split("fashion_mnist", "valid", data_dir=str(data_dir))
    return images, labels, test_images, test_labels


def test_real_fashion_mnist(fashion_train):
    images, labels, test_images, test_labels = fashion_train
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.int32
    assert abs(images.mean() / 255 - 0.2860) < 0.001
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [6000] * 10)
    # tfds' own (deterministic, hashed) order, not the IDX files' order (9, 0, 0, 3, ...).
    np.testing.assert_array_equal(labels[:10], [2, 1, 8, 4, 1, 9, 2, 2, 0, 2])
    assert test_images.shape == (10000, 28, 28, 1) and test_images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [1000] * 10)
    assert abs(test_images.mean() / 255 - 0.2868) < 0.001
