"""Fixtures shared across test modules."""

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddpm_jax import data
from ddpm_jax.errors import UserError


@pytest.fixture(scope="session")
def real_fashion(tmp_path_factory):
    """Fashion-MNIST prepared once from the official archives in $DDPM_JAX_DATA_DIR/fashion_mnist
    (28 s on this project's 2-vCPU machine, 2026-12-03), through a failed attempt and a killed one's leftovers first; the
    real-data tests of every module share it. Skips where DDPM_JAX_DATA_DIR is not set.

    Returns images, labels, test_images, test_labels (uint8 NHWC, int32), data_dir, archives.
    """
    if not os.environ.get("DDPM_JAX_DATA_DIR"):
        pytest.skip("set DDPM_JAX_DATA_DIR to a folder holding fashion_mnist/ with the official archives")
    archives = os.path.join(os.path.expanduser(os.environ["DDPM_JAX_DATA_DIR"]), "fashion_mnist")
    tmp = tmp_path_factory.mktemp("fashion")
    data_dir = tmp / "tfds"
    # 1) A failed attempt into the same data_dir: good labels, a truncated image archive,
    #    found through the <manual_dir>/<name>/ layout.
    bad = tmp / "bad_manual" / "fashion_mnist"
    bad.mkdir(parents=True)
    for archive in Path(archives).glob("*.gz"):
        payload = archive.read_bytes()
        (bad / archive.name).write_bytes(payload[:1000] if archive.name == "train-images-idx3-ubyte.gz" else payload)
    with pytest.raises(UserError, match=r"fashion_mnist/train-images-idx3-ubyte.gz does not match the checksum"):
        data.load_split("fashion_mnist", data_dir=str(data_dir), manual_dir=str(bad.parent))
    # 2) What a killed earlier preparation leaves behind must not get in the way.
    (data_dir / "fashion_mnist" / "incomplete.KILLED_3.0.1").mkdir(parents=True)
    (data_dir / "fashion_mnist" / "incomplete.KILLED_3.0.1" / "junk").write_bytes(b"junk")
    # 3) The real preparation, then a read of the prepared data without manual_dir.
    start = time.monotonic()
    images, labels = data.load_split("fashion_mnist", data_dir=str(data_dir), manual_dir=archives)
    prepare_and_load_s = time.monotonic() - start
    start = time.monotonic()
    test_images, test_labels = data.load_split("fashion_mnist", "test", data_dir=str(data_dir))
    print(f"\nfashion_mnist: prepare+load train {prepare_and_load_s:.1f} s, load test {time.monotonic() - start:.1f} s")
    with pytest.raises(UserError, match="cannot read split 'valid' of fashion_mnist: Unknown split 'valid'"):
        data.load_split("fashion_mnist", "valid", data_dir=str(data_dir))
    return SimpleNamespace(images=images, labels=labels, test_images=test_images, test_labels=test_labels,
                           data_dir=data_dir, archives=archives)
