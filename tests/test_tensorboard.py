"""TensorBoard logging, random flips and streamed data, through train.py (tfds mock data, tiny config).

Three runs serve every test here (a training process costs seconds): one with flips, the
data streamed from the host and TensorBoard on, stopped at step 5 and resumed to step 16
(with a stray event past the checkpoint and a torn record left in between, as a kill after
logging would leave them); and one uninterrupted with flips, the data on the device and
TensorBoard off.
"""

import glob
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.compat.proto import event_pb2

from cli_helpers import cli_env, finished, ok

from ddpm_jax import viz
from ddpm_jax.checkpoint import load_checkpoint
from ddpm_jax.run import trim_event_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 64  # with batch 8: 8 steps an epoch
FLIPS = ["--config", "configs/tiny.py", "--config.data.random_flip=True", "--config.train.num_epochs=2"]
LOGGING = ["--config.train.tensorboard=True", "--config.train.log_every_steps=2",
           "--config.train.sample_every_steps=4", "--config.sample.steps=2"]


def start_training(env, *args) -> subprocess.Popen:
    cmd = [sys.executable, "tests/mock_run.py", str(MOCK_EXAMPLES), "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train(env, *args):
    return ok(finished(start_training(env, *args)))


def events(logdir):
    """Every summary value in logdir's event files: [(step, tag, plugin, value)], value a float
    for scalars, the tensor for the others."""
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                tensor = tf.make_ndarray(v.tensor)
                plugin = v.metadata.plugin_data.plugin_name
                out.append((event.step, v.tag, plugin, float(tensor) if plugin == "scalars" else tensor))
    return out


def write_scalar(logdir, step, value):
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        tf.summary.scalar("loss", value, step=step)
    writer.close()


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = cli_env(tmp_path_factory)  # its compile cache is test_cli.py's: the same tiny programs
    root = tmp_path_factory.mktemp("tb")
    resumed, uninterrupted = root / "resumed", root / "uninterrupted"
    # The reference runs beside the other two (compiling is mostly single-threaded).
    reference = start_training(env, *FLIPS, f"--workdir={uninterrupted}", "--config.data.placement=device",
                               "--config.train.tensorboard=False")
    stopped = train(env, *FLIPS, *LOGGING, f"--workdir={resumed}", "--config.data.placement=stream",
                    "--config.train.max_steps=5")
    logdir = resumed / "tensorboard"
    write_scalar(logdir, 6, 123.0)  # logged after the last checkpoint (5), then killed
    with open(min(glob.glob(str(logdir / "*tfevents*"))), "ab") as f:
        f.write(b"\x17\x00\x00\x00torn")
    train(env, *FLIPS, *LOGGING, f"--workdir={resumed}", "--config.data.placement=stream")
    reference = ok(finished(reference))
    return {"resumed": resumed, "uninterrupted": uninterrupted, "stopped_stdout": stopped.stdout,
            "reference_stdout": reference.stdout}


def test_flipped_streamed_run_resumed_equals_uninterrupted_on_device(runs):
    assert "streamed from the host" in runs["stopped_stdout"]
    assert "on the device" in runs["reference_stdout"]
    _, params, meta = load_checkpoint(str(runs["resumed"]), "latest")
    _, reference, reference_meta = load_checkpoint(str(runs["uninterrupted"]), "latest")
    assert meta["checkpoint_step"] == reference_meta["checkpoint_step"] == 16
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    epoch_losses = [[r["loss"] for r in records(runs[k]) if "epoch" in r] for k in ("resumed", "uninterrupted")]
    assert epoch_losses[0] == epoch_losses[1] and len(epoch_losses[0]) == 2


def test_scalars_match_metrics_jsonl_once_per_step(runs):
    workdir = runs["resumed"]
    chunk_lines = [r for r in records(workdir) if "grad_norm" in r]
    assert [r["step"] for r in chunk_lines] == [4, 8, 12, 16]
    logged = [e for e in events(workdir / "tensorboard") if e[2] == "scalars"]
    for name in ("loss", "grad_norm", "lr", "images_per_s"):
        series = [(step, value) for step, tag, _, value in logged if tag == name]
        # Each step once (the stray step 6 is gone), with metrics.jsonl's value (float32 in the event file).
        assert [s for s, _ in series] == [r["step"] for r in chunk_lines], name
        assert [v for _, v in series] == pytest.approx([r[name] for r in chunk_lines], rel=1e-6), name
    epochs = [r for r in records(workdir) if "epoch" in r]
    assert [(s, v) for s, tag, _, v in logged if tag == "epoch_loss"] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in epochs]


def test_hparams_once_and_sample_grids_at_their_steps(runs):
    workdir = runs["resumed"]
    logged = events(workdir / "tensorboard")
    hparams = [e for e in logged if e[2] == "hparams"]
    assert len(hparams) == 1 and hparams[0][0] == 0  # written by the fresh run only
    grids = [(step, value) for step, tag, plugin, value in logged if plugin == "images"]
    assert [step for step, _ in grids] == [4, 8, 12, 16]
    expected = viz.make_grid(np.zeros((4, 28, 28, 1), np.uint8)).shape  # sample.num = 4
    for step, (width, height, png) in grids:
        assert (int(height), int(width)) == expected[:2]
        assert iio.imread(png).shape[:2] == expected[:2]
        assert (workdir / "samples" / f"step_{step:07d}.png").exists()


def test_nothing_is_written_without_tensorboard(runs):
    assert (runs["uninterrupted"] / "metrics.jsonl").exists()
    assert not (runs["uninterrupted"] / "tensorboard").exists()


def test_trim_event_files_keeps_what_a_checkpoint_covers(tmp_path):
    for step in range(1, 6):
        write_scalar(tmp_path, step, float(step))
    trim_event_files(str(tmp_path), 3)
    assert sorted(step for step, *_ in events(tmp_path)) == [1, 2, 3]
    trim_event_files(str(tmp_path), 0)  # a run that restarts from nothing
    assert not glob.glob(str(tmp_path / "*tfevents*"))
