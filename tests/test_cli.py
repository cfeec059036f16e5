"""End-to-end through the real CLIs (subprocesses), on tfds mock data with a tiny config."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from cli_helpers import cli_env, ok, user_error

from ddpm_jax.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 64  # with batch 8: 8 steps an epoch
TINY = ["--config", "configs/tiny.py"]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)


def run(env, script, *args, mock=True, timeout=600):
    cmd = [sys.executable, "tests/mock_run.py", str(MOCK_EXAMPLES), script] if mock else [sys.executable, script]
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def params_of(workdir, which="latest"):
    _, params, meta = load_checkpoint(str(workdir), which)
    return params, meta


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def epoch_records(workdir):
    """metrics.jsonl's epoch lines (the training lines between them have no 'epoch')."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "epoch" in r]


def snapshot(folder):
    """Every file under folder with its size and mtime: to check that nothing was touched."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def trained(env, tmp_path_factory):
    """2 epochs (16 steps) uninterrupted: the reference run."""
    workdir = tmp_path_factory.mktemp("run") / "uninterrupted"
    result = ok(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=2",
                    "--config.train.sample_every_epochs=2", "--config.train.log_every_steps=6"))
    return workdir, result


def test_training_writes_what_the_readme_promises(trained):
    workdir, result = trained
    assert "Loss at epoch 1:" in result.stdout and "Loss at epoch 2:" in result.stdout
    records = epoch_records(workdir)
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [8, 16]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    # A training line at the first chunk end (every 4 steps) past each multiple of log_every_steps = 6.
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "grad_norm" in r]
    assert [r["step"] for r in logged] == [8, 12]
    assert all(r["lr"] == 1e-3 and r["grad_norm"] > 0 and r["images_per_s"] > 0 for r in logged)
    assert iio.imread(workdir / "loss.png").shape[0] > 100
    first = iio.imread(workdir / "first_batch.png")
    assert first.dtype == np.uint8 and first.ndim == 2  # 8 grayscale 28x28 images on a grid
    forward = iio.imread(workdir / "forward.png")
    assert forward.shape[0] > 4 * first.shape[0]  # originals + 4 noise levels stacked
    grid = iio.imread(workdir / "samples" / "epoch_002.png")  # config.sample.num = 4 samples, upscaled 4x
    assert grid.shape == (2 * 112 + 2, 2 * 112 + 2)
    assert not (workdir / "samples" / "epoch_001.png").exists()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 16
    params, meta = params_of(workdir)
    assert meta["checkpoint_step"] == 16 and meta["image_shape"] == [28, 28, 1]
    assert sum(x.size for x in jax.tree.leaves(params)) == 41_609  # configs/tiny.py's U-Net


def test_sample_writes_npz_grid_and_gif(env, trained, tmp_path):
    workdir, _ = trained
    out, grid, gif = tmp_path / "s.npz", tmp_path / "g.png", tmp_path / "a.gif"
    ok(run(env, "sample.py", f"--ckpt={workdir}", "--num=6", "--batch=4", f"--out={out}", f"--grid={grid}",
           f"--gif={gif}", "--frames=5", "--seed=3", "--noprogress", mock=False))
    samples = np.load(out)["arr_0"]
    assert samples.shape == (6, 28, 28, 1) and samples.dtype == np.uint8
    picture = iio.imread(grid)
    assert picture.dtype == np.uint8 and picture.ndim == 2
    gif_frames = iio.imread(gif, index=None)
    # 5 frames of a 2 x 3 grid; Pillow merges the held copies of the last frame into
    # one frame that lasts 1 + 5 // 3 frame durations.
    assert gif_frames.shape[:3] == (5, 2 * 112, 3 * 112) and gif_frames.dtype == np.uint8  # upscaled 4x
    if gif_frames.ndim == 4:  # imageio may decode the grayscale palette as RGB
        assert np.all(gif_frames == gif_frames[..., :1])
    durations = [iio.immeta(gif, index=i)["duration"] for i in range(5)]
    assert durations[-1] == 2 * durations[0]
    # The same seed gives the same samples, whatever the batch size.
    out2 = tmp_path / "s2.npz"
    ok(run(env, "sample.py", f"--ckpt={workdir}/checkpoints", "--num=6", "--batch=6", f"--out={out2}", "--grid=",
           "--seed=3", "--noprogress", mock=False))
    np.testing.assert_array_equal(np.load(out2)["arr_0"], samples)
    # --display minmax stretches each stored image to 0..255, as the article's figures.
    out3 = tmp_path / "s3.npz"
    ok(run(env, "sample.py", f"--ckpt={workdir}", "--num=6", "--batch=6", f"--out={out3}", "--grid=",
           "--seed=3", "--display=minmax", "--noprogress", mock=False))
    stretched = np.load(out3)["arr_0"]
    assert (stretched.min(axis=(1, 2, 3)) == 0).all() and (stretched.max(axis=(1, 2, 3)) == 255).all()
    assert not np.array_equal(stretched, samples)
    # Outputs are never overwritten unless asked.
    before = out.read_bytes()
    user_error(run(env, "sample.py", f"--ckpt={workdir}", "--num=2", f"--out={out}", "--grid=", mock=False),
               str(out), "--overwrite")
    assert out.read_bytes() == before


def test_resume_after_max_steps_equals_uninterrupted(env, trained, tmp_path):
    reference, _ = trained
    workdir = tmp_path / "resumed"
    first = ok(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=2",
                   "--config.train.max_steps=5"))
    assert "Stopped at step 5" in first.stdout
    assert params_of(workdir)[1]["checkpoint_step"] == 5
    second = ok(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=2"))
    assert "Resuming from step 5" in second.stdout
    assert_same_params(params_of(workdir)[0], params_of(reference)[0])
    assert [r["loss"] for r in epoch_records(workdir)] == [r["loss"] for r in epoch_records(reference)]


def test_resume_after_kill_9_equals_uninterrupted(env, trained, tmp_path):
    reference, _ = trained
    workdir = tmp_path / "killed"
    cmd = [sys.executable, "tests/mock_run.py", str(MOCK_EXAMPLES), "train.py", *TINY, f"--workdir={workdir}",
           "--config.train.num_epochs=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (workdir / "checkpoints" / "8").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert 8 <= latest < 16
    # num_epochs only says how long to train: it may change on resume.
    resumed = ok(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=2"))
    assert f"Resuming from step {latest}" in resumed.stdout
    assert_same_params(params_of(workdir)[0], params_of(reference)[0])
    # The epoch record written before the kill is not duplicated by the resumed run.
    assert [r["epoch"] for r in epoch_records(workdir)] == [1, 2]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_resume_equals_uninterrupted(env, trained, tmp_path, signum):
    reference, _ = trained
    workdir = tmp_path / "stopped"
    cmd = [sys.executable, "tests/mock_run.py", str(MOCK_EXAMPLES), "train.py", *TINY, f"--workdir={workdir}",
           "--config.train.num_epochs=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The Ctrl-C handler is in place before the first pictures are written, and
    # the first chunk still has to compile then: the run stops before or after it.
    deadline = time.time() + 300
    while not (workdir / "first_batch.png").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, out + err  # 130 for Ctrl-C, 143 for SIGTERM
    assert "Traceback" not in err
    stopped = re.search(r"Interrupted \(\w+\) at step (\d+)", out)
    assert stopped and int(stopped.group(1)) % 4 == 0 and int(stopped.group(1)) < 16, out
    assert params_of(workdir)[1]["checkpoint_step"] == int(stopped.group(1))
    ok(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=2"))
    assert_same_params(params_of(workdir)[0], params_of(reference)[0])


def test_four_devices_train_and_sample_like_one(env, trained, tmp_path):
    reference, _ = trained
    four = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    workdir = tmp_path / "four"
    ok(run(four, "train.py", *TINY, f"--workdir={workdir}", "--config.train.max_steps=8"))
    ours, meta = params_of(workdir)
    theirs, their_meta = params_of(reference / "checkpoints" / "8")
    assert meta["checkpoint_step"] == their_meta["checkpoint_step"] == 8
    # The gradient all-reduce sums in another order; Adam normalises each coordinate's
    # step (about lr = 1e-3), so float-rounding differences can move a parameter by a
    # fraction of one step: allow a third of it.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=3e-4)
    ours_loss = epoch_records(workdir)[0]["loss"]
    theirs_loss = epoch_records(reference)[0]["loss"]
    assert ours_loss == pytest.approx(theirs_loss, rel=1e-4)
    outs = {}
    for name, e in (("one", env), ("four", four)):
        outs[name] = tmp_path / f"{name}.npz"
        result = ok(run(e, "sample.py", f"--ckpt={reference}", "--num=6", "--batch=6", f"--out={outs[name]}",
                        "--grid=", "--noprogress", mock=False))
        assert (f"on {4 if name == 'four' else 1} cpu device" in result.stdout), result.stdout
    one, four_samples = (np.load(outs[k])["arr_0"].astype(int) for k in ("one", "four"))
    assert np.abs(one - four_samples).max() <= 1 and np.mean(one == four_samples) > 0.99


def test_a_different_run_config_is_refused_and_nothing_touched(env, trained, tmp_path):
    reference, _ = trained
    workdir = tmp_path / "copy"
    shutil.copytree(reference, workdir)
    before = snapshot(workdir)
    line = user_error(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.batch_size=4",
                          "--config.optim.learning_rate=0.01"),
                      "train.batch_size", "optim.learning_rate")
    assert "seed" not in line
    assert snapshot(workdir) == before


def test_best_checkpoint_survives_resume(env, trained, tmp_path):
    reference, _ = trained
    losses = [r["loss"] for r in epoch_records(reference)]
    best_epoch = 1 + int(np.argmin(losses))
    workdir = tmp_path / "best"
    ok(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=2",
           "--config.train.max_steps=12", "--config.train.keep_checkpoints=1"))
    ok(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=2",
           "--config.train.keep_checkpoints=1"))
    _, meta = params_of(workdir, "best")
    assert meta["checkpoint_step"] == 8 * best_epoch
    assert meta["best_loss"] == pytest.approx(min(losses[:best_epoch]))


def test_corrupt_latest_checkpoint_is_reported_by_train(env, trained, tmp_path):
    reference, _ = trained
    workdir = tmp_path / "corrupt-train"
    shutil.copytree(reference, workdir)
    for p in (workdir / "checkpoints" / "16").rglob("*"):
        if p.is_file() and "state" in p.parts:
            p.write_bytes(b"garbage")
    before = snapshot(workdir)
    user_error(run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.train.num_epochs=3"),
               "checkpoints/16", "move that folder out")
    assert snapshot(workdir) == before


def test_sample_errors(env, trained, tmp_path):
    workdir, _ = trained
    user_error(run(env, "sample.py", f"--ckpt={tmp_path / 'nope'}", mock=False), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(run(env, "sample.py", f"--ckpt={empty}", f"--out={tmp_path / 'x.npz'}", mock=False), "no checkpoints")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(workdir, corrupt)
    step_dir = corrupt / "checkpoints" / "16"
    victims = [p for p in step_dir.rglob("*") if p.is_file() and "state" in p.parts]
    for p in victims:
        p.write_bytes(b"garbage")
    before = snapshot(corrupt)
    user_error(run(env, "sample.py", f"--ckpt={step_dir}", f"--out={tmp_path / 'y.npz'}", "--grid=", mock=False),
               "16")
    assert snapshot(corrupt) == before
    assert not (tmp_path / "y.npz").exists()


@pytest.mark.parametrize("script,flag", [("train.py", "--config"), ("sample.py", "--ckpt")])
def test_help(env, script, flag):
    result = ok(run(env, script, "--help", mock=False))
    assert flag in result.stdout and "python" in result.stdout


@pytest.mark.parametrize("args,words", [
    (["--config.train.nonexistent=3"], ["nonexistent"]),
    (["--config.train.batch_size=lots"], ["batch_size"]),
    (["--config=configs/missing.py"], ["configs/missing.py"]),
    (["--frobnicate"], ["frobnicate"]),
    (["--config.data.placement=gpu"], ["data.placement", "auto, device, stream", "'gpu'"]),
])
def test_config_mistakes(env, tmp_path, args, words):
    config = [] if any(a.startswith("--config=") for a in args) else TINY
    user_error(run(env, "train.py", *config, *args, f"--workdir={tmp_path / 'w'}", mock=False), *words)
    assert not (tmp_path / "w").exists()


def test_offline_without_data_names_manual_dir(env, tmp_path):
    started = time.time()
    user_error(run(env, "train.py", *TINY, f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'd'}",
                   mock=False), "manual_dir")
    assert time.time() - started < 120


def test_manual_dir_without_archives(env, tmp_path):
    empty = tmp_path / "archives"
    empty.mkdir()
    user_error(run(env, "train.py", *TINY, f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'd'}",
                   f"--config.data.manual_dir={empty}", mock=False), str(empty))


def test_unwritable_workdir(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    user_error(run(env, "train.py", *TINY, f"--workdir={blocker / 'sub'}"), "workdir")
    assert blocker.read_text() == "I am a file"


def test_nan_loss_keeps_last_good_checkpoint(env, tmp_path):
    workdir = tmp_path / "nan"
    # Adam's first step moves every parameter by about the learning rate: at 1e30 the
    # second step's loss is no longer finite. Step 1 is checkpointed before that.
    result = run(env, "train.py", *TINY, f"--workdir={workdir}", "--config.optim.learning_rate=1e30",
                 "--config.train.checkpoint_every_steps=1", "--config.train.steps_per_chunk=1")
    user_error(result, "loss", "step 1", "learning_rate")
    params, meta = params_of(workdir)
    assert meta["checkpoint_step"] == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_real_fashion_mnist_smoke(env, real_fashion, tmp_path):
    workdir = tmp_path / "real"
    result = ok(run(env, "train.py", "--config=configs/fashion.py", f"--workdir={workdir}",
                    f"--config.data.manual_dir={real_fashion.archives}",
                    f"--config.data.data_dir={real_fashion.data_dir}",
                    "--config.train.max_steps=3", "--config.train.steps_per_chunk=3",
                    "--config.train.progress=False", mock=False))
    assert "Stopped at step 3" in result.stdout
    params, meta = params_of(workdir)
    assert meta["checkpoint_step"] == 3 and meta["image_shape"] == [28, 28, 1]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


# configs/tiny.py's U-Net, with attention and labels.
COND_UNET = ["--config.model.attention_resolutions=(14,)", "--config.model.num_classes=10",
             "--config.train.ema_decay=0.9", "--config.sample.sampler=ddim", "--config.sample.steps=5"]


@pytest.fixture(scope="session")
def conditional(env, tmp_path_factory):
    """One epoch of a small class-conditional U-Net with EMA."""
    workdir = tmp_path_factory.mktemp("run") / "conditional"
    ok(run(env, "train.py", *TINY, *COND_UNET, f"--workdir={workdir}", "--config.train.sample_every_epochs=1",
           "--config.sample.num=20"))
    return workdir


def test_conditional_ema_run_samples_by_class(env, conditional, tmp_path):
    _, params, meta = load_checkpoint(str(conditional), "latest")
    assert "ema_params" in meta  # the EMA is checkpointed beside the parameters
    assert not np.allclose(jax.tree.leaves(meta["ema_params"])[0], jax.tree.leaves(params)[0])
    # The training grid has one row per class: 10 rows of 2 for 20 samples.
    assert iio.imread(conditional / "samples" / "epoch_001.png").shape == (10 * 114 - 2, 2 * 114 - 2)

    def draw(name, *args):
        out = tmp_path / f"{name}.npz"
        result = ok(run(env, "sample.py", f"--ckpt={conditional}", "--num=3", f"--out={out}", "--grid=",
                        "--noprogress", *args, mock=False))
        return np.load(out)["arr_0"], result.stdout

    ema, says = draw("ema")
    assert "ema weights" in says and "ddim, 5 steps" in says
    raw, says = draw("raw", "--weights=raw")
    assert "raw weights" in says and not np.array_equal(ema, raw)
    sneaker, _ = draw("sneaker", "--label=sneaker", "--guidance=2")
    seven, _ = draw("seven", "--label=7", "--guidance=2")
    np.testing.assert_array_equal(sneaker, seven)  # class 7 of Fashion-MNIST is 'Sneaker'
    unguided, _ = draw("unguided", "--label=7", "--guidance=0")
    assert not np.array_equal(sneaker, unguided)
    ddpm, says = draw("ddpm", "--sampler=ddpm", "--steps=0", "--label=none")
    assert ddpm.shape == (3, 28, 28, 1) and "ddpm, 50 steps" in says
    user_error(run(env, "sample.py", f"--ckpt={conditional}", "--label=cat", f"--out={tmp_path / 'x.npz'}",
                   "--grid=", mock=False), "unknown fashion_mnist label 'cat'", "Sneaker")


def test_sampler_choices_errors(env, trained, tmp_path):
    out = f"--out={tmp_path / 'x.npz'}"
    user_error(run(env, "sample.py", f"--ckpt={trained[0]}", "--label=3", out, "--grid=", mock=False),
               "--label", "unconditional")
    user_error(run(env, "sample.py", f"--ckpt={trained[0]}", "--weights=ema", out, "--grid=", mock=False),
               "no EMA weights", "--weights raw")
    user_error(run(env, "sample.py", f"--ckpt={trained[0]}", "--steps=51", out, "--grid=", mock=False),
               "--steps", "model's 50 steps", "got 51")
    assert not os.path.exists(tmp_path / "x.npz")


def test_default_workdir_is_the_config_name_and_max_minutes_stops_in_time(env, tmp_path):
    # Run from another folder: the workdir is runs/<config file stem> under it.
    cmd = [sys.executable, os.path.join(ROOT, "tests", "mock_run.py"), str(MOCK_EXAMPLES),
           os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--config.train.max_minutes=0.0001"]
    result = ok(subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600))
    assert "train.max_minutes" in result.stdout and "Stopped at step 0" in result.stdout
    assert params_of(tmp_path / "runs" / "tiny")[1]["checkpoint_step"] == 0


def test_auto_placement_keeps_the_data_on_the_device_when_it_takes_a_quarter_at_most():
    from ddpm_jax.run import choose_placement

    class Device:
        def __init__(self, platform, stats):
            self.platform, self.stats = platform, stats

        def memory_stats(self):
            return self.stats

    gpu = Device("gpu", {"bytes_limit": 4000, "bytes_in_use": 0})
    assert choose_placement("auto", 1000, gpu) == "device"
    assert choose_placement("auto", 1001, gpu) == "stream"
    assert choose_placement("device", 10**9, gpu) == "device"  # asked for: as asked
    assert choose_placement("stream", 1, gpu) == "stream"
    assert choose_placement("auto", 10**12, Device("cpu", None)) == "device"  # the host's memory either way
    assert choose_placement("auto", 10**12, Device("tpu", None)) == "device"  # no figure: as before


def test_streamed_chunks_hold_the_batches_of_the_data_on_the_device():
    from ddpm_jax.parallel import make_mesh, replicated
    from ddpm_jax.run import _ChunkData
    from ddpm_jax.training import run_keys

    images = np.arange(40 * 2 * 2, dtype=np.uint8).reshape(40, 2, 2, 1)  # image i is told by its pixels
    labels = np.arange(40, dtype=np.int32)
    where = dict(sharding=replicated(make_mesh()), data_key=run_keys(jax.random.key(0))["data"], batch_size=4,
                 steps_per_epoch=10, chunk_steps=3)
    device, stream = (_ChunkData(images, labels, placement, **where) for placement in ("device", "stream"))
    for step, n in [(0, 3), (3, 3), (9, 1), (10, 3), (18, 2)]:  # chunks cut short by an epoch's end included
        *on_device, first = device.chunk(step, n)
        *streamed, first_streamed = stream.chunk(step, n)
        assert first_streamed == 0 and streamed[0].shape == (12, 2, 2, 1)  # one shape for every length
        for b in range(n):
            rows = [np.asarray(o)[(f + b) * 4:(f + b + 1) * 4] for o, f in ((on_device[2], first),
                                                                           (streamed[2], 0))]
            for d, s in zip(on_device[:2], streamed[:2]):
                np.testing.assert_array_equal(np.asarray(d)[rows[0]], np.asarray(s)[rows[1]])
    stream.send_ahead(20, 3)  # sent ahead: the chunk then takes those arrays
    assert stream.chunk(20, 3)[0] is stream._ahead[1][0]
