"""sample.py in one subprocess, with a tiny model in place of a checkpoint (no training):
resuming an interrupted run, atomic output writes, out-of-memory as one line.

The driver below runs sample.py's main through cli.run several times in one process
(compiles are shared); load_trained returns a tiny 8-step model, and generate is wrapped
to raise KeyboardInterrupt after a given number of finished batches (as Ctrl-C would).
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import flags

from ddpm_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r'''
import json, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
import jax, jax.numpy as jnp, numpy as np
from absl import flags
from ddpm_jax import cli, generate as gen
from ddpm_jax.config import base_config
from ddpm_jax.schedule import make_schedule
from tiny_model import TinyEpsNet
import sample

out = sys.argv[1]
config = base_config()
config.diffusion.n_steps = 8
model = TinyEpsNet()
params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
trained = gen.Trained(config=config, model=model, params=params, schedule=make_schedule(config.diffusion),
                      image_shape=(28, 28, 1), weights="raw",
                      meta={"checkpoint_dir": "fake/checkpoints/8", "checkpoint_step": 8})
gen.load_trained = lambda *a, **k: trained
sample.GIF_SAMPLES = 4  # the GIF's samples (drawn first) and the rest both span batches
real_generate = gen.generate
results = {}

def run(name, argv, interrupt_after=None):
    batches = []
    def generate(*args, on_batch=None, **kwargs):
        def counted(end, x0):
            on_batch(end, x0)
            batches.append(end)
            if interrupt_after is not None and len(batches) >= interrupt_after:
                raise KeyboardInterrupt
        return real_generate(*args, on_batch=counted, **kwargs)
    gen.generate = generate
    flags.FLAGS.unparse_flags()
    code = 0
    try:
        cli.run(sample.main, ["sample.py", "--ckpt=fake", "--noprogress", "--frames=3", *argv])
    except SystemExit as e:
        code = e.code
    results[name] = {"code": code, "batches": batches}

common = ["--num=10", "--batch=3"]
def outputs(tag):
    return [f"--out={out}/{tag}.npz", f"--grid={out}/{tag}.png", f"--gif={out}/{tag}.gif"]

run("whole", common + outputs("whole"))
run("cut_in_gif_part", common + outputs("a"), interrupt_after=1)   # before the GIF's frames are back
run("resume_a", common + outputs("a"))
run("cut_after_gif", common + outputs("b"), interrupt_after=3)      # GIF samples 0-3 and 4-6 kept
run("resume_b", common + outputs("b"))
run("cut_c", common + outputs("c"), interrupt_after=3)
run("other_seed_c", common + outputs("c") + ["--seed=1"])            # the partial's seed differs: not used

def broken_savez(f, **arrays):  # the partial file is written; samples.npz is cut short
    if "partial" in f.name:
        return real_savez(f, **arrays)
    f.write(b"PK-half-an-npz")
    raise KeyboardInterrupt
real_savez = np.savez
np.savez = broken_savez
run("savez_cut", common + [f"--out={out}/d.npz", "--grid=", "--gif="])
np.savez = real_savez
results["after_savez_cut"] = sorted(os.listdir(out))
run("resume_d", common + [f"--out={out}/d.npz", "--grid=", "--gif="])

def oom_main():
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.21GiB.\nmore")
flags.FLAGS.unparse_flags()
try:
    cli.run(oom_main, ["sample.py", "--ckpt=fake", "--batch=7"])
except SystemExit as e:
    results["oom_code"] = e.code
json.dump(results, open(os.path.join(out, "results.json"), "w"))
'''


def test_resume_atomic_writes_and_out_of_memory(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DDPM_JAX_COMPILE_CACHE": "off", "DDPM_JAX_CPU_TUNING": "off"}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    r = json.loads((tmp_path / "results.json").read_text())
    # Uninterrupted: the GIF's 4 samples in batches (0-2, 3), then 4-6, 7-9.
    assert r["whole"] == {"code": 0, "batches": [3, 4, 7, 10]}
    whole = {ext: (tmp_path / f"whole.{ext}").read_bytes() for ext in ("npz", "png", "gif")}
    assert np.load(tmp_path / "whole.npz")["arr_0"].shape == (10, 28, 28, 1)
    for tag, cut in (("a", "cut_in_gif_part"), ("b", "cut_after_gif")):
        assert r[cut]["code"] == 130
        assert "interrupted" in result.stderr and f"{tag}.npz.partial.npz; rerun" in result.stderr
        # The resumed run gives the very same files, and removes its partial file.
        for ext in ("npz", "png", "gif"):
            assert (tmp_path / f"{tag}.{ext}").read_bytes() == whole[ext], (tag, ext)
        assert not (tmp_path / f"{tag}.npz.partial.npz").exists()
    # Cut before the GIF's trajectories came back: its batches are drawn again, nothing else;
    # cut after them: only the missing batch is drawn.
    assert r["resume_a"]["batches"] == [3, 4, 7, 10] and r["resume_b"]["batches"] == [10]
    # A partial made with another seed is not used.
    assert "made with other settings" in result.stderr and r["other_seed_c"]["batches"] == [3, 4, 7, 10]
    assert not np.array_equal(np.load(tmp_path / "c.npz")["arr_0"], np.load(tmp_path / "whole.npz")["arr_0"])
    # A write of samples.npz cut short leaves no file at the target (nor a temporary), and
    # the samples wait in the partial file: the rerun draws nothing and writes them.
    assert r["savez_cut"]["code"] == 130
    assert "d.npz" not in r["after_savez_cut"] and "d.npz.partial.npz" in r["after_savez_cut"]
    assert not any(name.endswith(".tmp") for name in r["after_savez_cut"])
    assert r["resume_d"]["batches"] == []
    np.testing.assert_array_equal(np.load(tmp_path / "d.npz")["arr_0"], np.load(tmp_path / "whole.npz")["arr_0"])
    # Out of memory: one line naming --batch, exit 2.
    assert r["oom_code"] == 2
    lines = [line for line in result.stderr.splitlines() if "out of memory" in line]
    assert lines == ["error: out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.21GiB.); "
                     "try a smaller --batch (now 7)"], result.stderr


def test_out_of_memory_message_for_train_py():
    import ml_collections

    values = flags.FlagValues()
    flags.DEFINE_string("config", None, "", flag_values=values)
    values(["train.py"])
    values.config = ml_collections.ConfigDict({"train": {"batch_size": 128}})
    error = type("XlaRuntimeError", (RuntimeError,), {})("RESOURCE_EXHAUSTED: Out of memory allocating 5 GiB")
    assert cli.is_out_of_memory(error) and cli.is_out_of_memory(MemoryError())
    assert not cli.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED")) and not cli.is_out_of_memory(ValueError("x"))
    assert cli.out_of_memory_message(error, values) == (
        "out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 5 GiB); "
        "try a smaller --config.train.batch_size (now 128)")
