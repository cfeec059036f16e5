"""Tests for ddpm_jax.checkpoint: round trips, retention, resolve, load_checkpoint, errors, a full disk."""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ddpm_jax import checkpoint as ckpt
from ddpm_jax.config import base_config
from ddpm_jax.errors import UserError

# A failed read of a damaged checkpoint leaves TensorStore callbacks and coroutines that report
# themselves as unraisable exceptions later, when they are collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module", autouse=True)
def _collect_failed_reads():
    """Collects those leftovers before the module ends, under its warning filter."""
    yield
    gc.collect()


# --------------------------------------------------------------------------- helpers


def make_state(seed: int = 0, ema: bool = False) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "Dense_0": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jax.random.normal(k2, (4,))},
        "scale": jax.random.normal(k3, (2,), dtype=jnp.bfloat16),
    }
    # A few Adam updates so that count/mu/nu are not trivial.
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    for _ in range(2):
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(123, jnp.int32),
        "rng": jax.random.key_data(jax.random.PRNGKey(seed + 1)),
    }
    if ema:
        state["ema_params"] = jax.tree.map(lambda p: p * 0.5, params)
    return state


def as_json(value):
    """What a value looks like after a trip through JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def make_meta(epoch: int = 1, **extra) -> dict:
    meta = {
        "config": base_config().to_dict(),
        "epoch": epoch,
        "step_in_epoch": 0,
        "epoch_loss_sum": 12.5,
        "best_loss": None,
        "image_shape": [28, 28, 1],
    }
    meta.update(extra)
    return meta


def assert_trees_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def snapshot(root: str) -> dict:
    """Every file and folder under root, with file sizes and content hashes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def step_dirs(workdir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def write_run(workdir: str, losses, keep: int = 3, ema: bool = False) -> dict:
    """Saves steps 1..len(losses) (epoch_loss from `losses`); returns the last state."""
    with ckpt.open_manager(workdir, keep=keep) as manager:
        for step, loss in enumerate(losses, start=1):
            state = make_state(seed=step, ema=ema)
            assert ckpt.save(manager, step, state, make_meta(epoch=step), epoch_loss=loss)
    return state


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A workdir with steps 1, 2, 3: losses 0.5, 0.2 (best), None (latest)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    write_run(workdir, [0.5, 0.2, None], ema=True)
    return workdir


@pytest.fixture
def trained_copy(trained, tmp_path) -> str:
    """A private copy of `trained`, for tests that corrupt it."""
    dst = str(tmp_path / "run")
    shutil.copytree(trained, dst)
    return dst


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("abstract", [True, False], ids=["eval_shape-target", "array-target"])
def test_save_restore_round_trip_is_bit_exact(tmp_path, abstract):
    state = make_state(seed=7)
    meta = make_meta(epoch=4, best_loss=0.25, note={"nested": [1, 2.5, None, "x"]})
    workdir = str(tmp_path)
    with ckpt.open_manager(workdir) as manager:
        assert ckpt.save(manager, 5, state, meta, epoch_loss=0.3)
        # no wait_until_finished(): restore() must wait for the in-flight save itself
        fresh = make_state(seed=99)  # same structure, other values
        target = jax.eval_shape(lambda: fresh) if abstract else fresh
        restored, restored_meta = ckpt.restore(manager, 5, target)

    assert_trees_bit_equal(restored, state)
    # optax's namedtuples, not dicts/lists
    assert type(restored["opt_state"]) is type(state["opt_state"])
    assert type(restored["opt_state"][0]) is optax.ScaleByAdamState
    assert isinstance(restored["params"]["Dense_0"]["kernel"], jax.Array)
    assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 123
    assert restored["rng"].dtype == jnp.uint32
    assert restored["params"]["scale"].dtype == jnp.bfloat16
    assert restored_meta == as_json(meta)


# --------------------------------------------------------------------------- retention


def test_retention_keeps_latest_n_and_the_best(tmp_path):
    workdir = str(tmp_path)
    write_run(workdir, [0.5, 0.3, None, 0.4, None, 0.45], keep=2)  # `with` closes = waits
    assert step_dirs(workdir) == [2, 5, 6]
    leftovers = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if not n.isdigit()]
    assert leftovers == []

    # A new manager (a resumed run) reads the metrics back and continues the same way.
    with ckpt.open_manager(workdir, keep=2) as manager:
        assert manager.all_steps() == [2, 5, 6]
        assert manager.best_step() == 2
        assert manager.latest_step() == 6
        ckpt.save(manager, 7, make_state(), make_meta(), epoch_loss=None)
        ckpt.save(manager, 8, make_state(), make_meta(), epoch_loss=None)
    assert step_dirs(workdir) == [2, 7, 8]  # metric-less saves did not evict the best

    with ckpt.open_manager(workdir, keep=2) as manager:
        ckpt.save(manager, 9, make_state(), make_meta(), epoch_loss=0.1)
        assert manager.best_step() == 9
    assert step_dirs(workdir) == [8, 9]  # the old best is no longer special


def test_saves_without_finite_metric_are_never_best(tmp_path):
    workdir = str(tmp_path)
    write_run(workdir, [None, float("nan"), None, float("inf")], keep=1)
    with ckpt.open_manager(workdir, keep=1) as manager:
        assert manager.best_step() is None
        assert manager.latest_step() == 4
    assert step_dirs(workdir) == [4]
    assert ckpt.resolve(workdir, "best") == (os.path.join(workdir, "checkpoints"), 4)


def test_saving_an_existing_or_older_step_is_skipped(tmp_path):
    workdir = str(tmp_path)
    write_run(workdir, [0.5, 0.4])
    before = snapshot(workdir)
    with ckpt.open_manager(workdir) as manager:
        assert ckpt.save(manager, 2, make_state(seed=5), make_meta(), epoch_loss=0.0) is False
        assert ckpt.save(manager, 1, make_state(seed=5), make_meta(), epoch_loss=0.0) is False
        assert manager.best_step() == 2
    assert snapshot(workdir) == before


def test_checkpoint_written_on_another_device_restores_here(trained_copy):
    """A GPU-written checkpoint must load on a CPU-only machine (and vice versa).

    Simulated by rewriting the saved shardings (Orbax's state/_sharding JSON) to
    name a device that does not exist here.
    """
    sharding_file = os.path.join(trained_copy, "checkpoints", "2", "state", "_sharding")
    with open(sharding_file) as fh:
        text = fh.read()
    device = jax.local_devices()[0]
    here = f"{device.platform}:{device.id}"
    assert here in text
    with open(sharding_file, "w") as fh:
        fh.write(text.replace(here, "tpu:7"))

    _, params, _ = ckpt.load_checkpoint(trained_copy)
    assert_trees_bit_equal(params, make_state(seed=2)["params"])
    with ckpt.open_manager(trained_copy) as manager:
        state, _ = ckpt.restore(manager, 2, jax.eval_shape(lambda: make_state(ema=True)))
    assert_trees_bit_equal(state, make_state(seed=2, ema=True))
    assert all(x.sharding.device_set == {device} for x in jax.tree.leaves(state))


# --------------------------------------------------------------------------- resolve


def test_resolve_workdir_checkpoints_dir_and_step_folder(trained):
    cdir = os.path.join(trained, "checkpoints")
    assert ckpt.resolve(trained) == (cdir, 2)  # default: best
    assert ckpt.resolve(trained, "best") == (cdir, 2)
    assert ckpt.resolve(trained, "latest") == (cdir, 3)
    assert ckpt.resolve(cdir, "best") == (cdir, 2)
    assert ckpt.resolve(cdir, "latest") == (cdir, 3)
    assert ckpt.resolve(cdir + "/") == (cdir, 2)
    # an explicit step folder wins over `which`
    assert ckpt.resolve(os.path.join(cdir, "1"), "best") == (cdir, 1)
    assert ckpt.resolve(os.path.join(cdir, "1"), "latest") == (cdir, 1)


def test_resolve_relative_path(trained, monkeypatch):
    monkeypatch.chdir(os.path.dirname(trained))
    assert ckpt.resolve(os.path.basename(trained), "latest") == (os.path.join(trained, "checkpoints"), 3)


def test_resolve_best_falls_back_to_latest(tmp_path):
    workdir = str(tmp_path)
    write_run(workdir, [None, None])
    assert ckpt.resolve(workdir, "best") == (os.path.join(workdir, "checkpoints"), 2)


def test_resolve_unknown_which(trained):
    with pytest.raises(UserError, match="unknown checkpoint choice 'newest'"):
        ckpt.resolve(trained, "newest")
    with pytest.raises(UserError, match="unknown checkpoint choice"):
        ckpt.load_checkpoint(trained, "Best")


# --------------------------------------------------------------------------- load_checkpoint


def test_load_checkpoint_needs_nothing_but_the_path(trained):
    config, params, meta = ckpt.load_checkpoint(trained)  # best = step 2
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.to_dict() == as_json(base_config().to_dict())  # JSON has no tuples: they come back as lists
    assert config.train.batch_size == 128 and config.diffusion.beta_min == 1e-4
    expected = make_state(seed=2, ema=True)
    assert_trees_bit_equal(params, expected["params"])
    assert isinstance(params, dict) and set(params) == {"Dense_0", "scale"}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    assert_trees_bit_equal(meta["ema_params"], expected["ema_params"])
    assert meta["epoch"] == 2 and meta["image_shape"] == [28, 28, 1]
    assert meta["checkpoint_step"] == 2
    assert meta["checkpoint_dir"] == os.path.join(trained, "checkpoints", "2")


def test_load_checkpoint_latest_and_step_folder(trained):
    _, params, meta = ckpt.load_checkpoint(trained, "latest")
    assert meta["checkpoint_step"] == 3
    assert_trees_bit_equal(params, make_state(seed=3)["params"])
    _, params, meta = ckpt.load_checkpoint(os.path.join(trained, "checkpoints", "1"))
    assert meta["checkpoint_step"] == 1
    assert_trees_bit_equal(params, make_state(seed=1)["params"])


def test_load_checkpoint_without_ema(tmp_path):
    write_run(str(tmp_path), [0.1])
    _, params, meta = ckpt.load_checkpoint(str(tmp_path))
    assert "ema_params" not in meta
    assert_trees_bit_equal(params, make_state(seed=1)["params"])


def test_reading_writes_nothing(trained):
    before = snapshot(trained)
    ckpt.resolve(trained)
    ckpt.load_checkpoint(trained)
    ckpt.load_checkpoint(trained, "latest")
    assert snapshot(trained) == before


# --------------------------------------------------------------------------- errors


def test_nonexistent_path(tmp_path):
    missing = str(tmp_path / "nope")
    for call in (lambda: ckpt.resolve(missing), lambda: ckpt.load_checkpoint(missing)):
        with pytest.raises(UserError, match="does not exist") as info:
            call()
        assert missing in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(missing)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(UserError, match="is a file"):
        ckpt.resolve(str(f))


@pytest.mark.parametrize("layout", ["empty-folder", "empty-checkpoints", "junk-only"])
def test_no_checkpoints(tmp_path, layout):
    root = str(tmp_path)
    if layout == "empty-checkpoints":
        os.mkdir(os.path.join(root, "checkpoints"))
    if layout == "junk-only":
        os.makedirs(os.path.join(root, "checkpoints", "notes"))
        os.makedirs(os.path.join(root, "checkpoints", "7.orbax-checkpoint-tmp-1"))
    before = snapshot(root)
    with pytest.raises(UserError, match="no checkpoints in") as info:
        ckpt.load_checkpoint(root)
    assert "\n" not in str(info.value)
    assert snapshot(root) == before


def test_missing_step_folder_of_existing_checkpoints(trained):
    missing = os.path.join(trained, "checkpoints", "9")
    with pytest.raises(UserError, match=f"{missing} does not exist"):
        ckpt.load_checkpoint(missing)


def _truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "state-metadata-deleted": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "state-metadata-truncated": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
    "array-data-truncated": lambda d: [_truncate(p) for p in glob.glob(os.path.join(d, "state", "d", "*"))],
    "array-data-deleted": lambda d: [os.remove(p) for p in glob.glob(os.path.join(d, "state", "d", "*"))],
    "ocdbt-manifest-deleted": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "state-folder-deleted": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "meta-deleted": lambda d: os.remove(os.path.join(d, "meta", "metadata")),
    "meta-truncated": lambda d: _truncate(os.path.join(d, "meta", "metadata")),
    "emptied": lambda d: [shutil.rmtree(d), os.mkdir(d)],
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_step_folder_is_one_line_naming_it_and_nothing_is_touched(trained_copy, corruption):
    step_dir = os.path.join(trained_copy, "checkpoints", "2")
    CORRUPTIONS[corruption](step_dir)
    before = snapshot(trained_copy)

    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(step_dir)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert f"cannot read checkpoint {step_dir} (" in message and "move that folder out" in message
    with ckpt.open_manager(trained_copy) as manager:
        with pytest.raises(ckpt.CheckpointError, match=f"cannot read checkpoint {step_dir} "):
            ckpt.restore(manager, 2, jax.eval_shape(lambda: make_state(ema=True)))
    assert snapshot(trained_copy) == before


def test_corrupt_metrics_file_is_one_line_naming_the_folder(trained_copy):
    _truncate(os.path.join(trained_copy, "checkpoints", "1", "metrics", "metrics"))
    before = snapshot(trained_copy)
    for call in (lambda: ckpt.load_checkpoint(trained_copy), lambda: ckpt.open_manager(trained_copy)):
        with pytest.raises(ckpt.CheckpointError) as info:
            call()  # Orbax reads every step's metrics when it opens the folder
        message = str(info.value)
        assert "\n" not in message and os.path.join(trained_copy, "checkpoints") in message
    assert snapshot(trained_copy) == before


def test_restore_into_a_different_structure_is_a_user_error(trained):
    before = snapshot(trained)
    with ckpt.open_manager(trained) as manager:
        wider = make_state(ema=True)
        wider["params"]["Dense_0"]["bias"] = jnp.zeros((5,))
        with pytest.raises(UserError, match="cannot read checkpoint .*checkpoints/2 ") as info:
            ckpt.restore(manager, 2, jax.eval_shape(lambda: wider))
        assert "\n" not in str(info.value)
        with pytest.raises(UserError, match="cannot read checkpoint .*checkpoints/4 "):
            ckpt.restore(manager, 4, jax.eval_shape(lambda: make_state(ema=True)))
    assert snapshot(trained) == before


# --------------------------------------------------------------------------- a full disk

_DISK_FULL_SCRIPT = r"""
import errno, sys
import jax.numpy as jnp
import orbax.checkpoint as ocp
from ddpm_jax import checkpoint as ckpt, cli
from ddpm_jax.config import base_config

def main():
    meta = {"config": base_config().to_dict()}
    with ckpt.open_manager(sys.argv[1], keep=1) as manager:
        ckpt.save(manager, 1, {"params": jnp.ones((2, 3))}, meta, epoch_loss=0.5)
        manager.wait_until_finished()

        async def disk_full(*args, **kwargs):
            if sys.argv[2] == "python":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 207 bytes to file 19: '
                             "No space left on device [os_error_code='28']")  # TensorStore's words (Orbax's arrays)

        ocp.JsonCheckpointHandler._save_fn = disk_full  # step 2's JSON items cannot be written
        ckpt.save(manager, 2, {"params": jnp.zeros((2, 3))}, meta, epoch_loss=0.1)  # keep=1: evicts step 1

cli.run(main, ["disk_full"])
"""


@pytest.mark.parametrize("reporter", ["python", "tensorstore"])
def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_is_one_line(tmp_path, reporter):
    workdir = str(tmp_path)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL_SCRIPT, workdir, reporter],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), proc.stderr
    assert "the earlier ones are kept" in lines[0]
    # The last good checkpoint survived, whole.
    assert step_dirs(workdir) == [1]
    _, params, meta = ckpt.load_checkpoint(workdir, "latest")
    assert meta["checkpoint_step"] == 1
    np.testing.assert_array_equal(np.asarray(params), np.ones((2, 3)))
    # Once there is space again, the rerun saves over what the failed save left behind.
    with ckpt.open_manager(workdir, keep=1) as manager:
        assert ckpt.save(manager, 2, {"params": jnp.zeros((2, 3))}, make_meta(), epoch_loss=0.1)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
