"""The benchmark scripts run and print what they promise (tiny work: a smoke test, no timings asserted)."""

import json
import os
import subprocess
import sys

from cli_helpers import cli_env, ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(env, tmp_path, script, *args):
    out = tmp_path / f"{os.path.basename(script)}.json"
    ok(subprocess.run([sys.executable, script, *args, "--json", str(out)], cwd=ROOT, env=env,
                      capture_output=True, text=True, timeout=600))
    return json.loads(out.read_text())


def test_sample_throughput(tmp_path_factory, tmp_path):
    result = run_json(cli_env(tmp_path_factory), tmp_path, "benchmarks/sample_throughput.py", "--config",
                      "configs/tiny.py", "--num", "2", "--repeats", "1", "--config.sample.sampler=ddim",
                      "--config.sample.steps=3")
    assert (result["sampler"], result["steps"], result["n_steps"], result["num_samples"]) == ("ddim", 3, 50, 2)
    assert result["images_per_s"] > 0


def test_train_throughput_with_a_learning_rate_schedule(tmp_path_factory, tmp_path):
    # Warm-up and decay need the run's planned steps (the fast configs'); tiny: 8 steps an epoch.
    result = run_json(cli_env(tmp_path_factory), tmp_path, "benchmarks/train_throughput.py", "--config",
                      "configs/tiny.py", "--steps", "3", "--num_examples", "64", "--config.optim.warmup_steps=5",
                      "--config.optim.decay=cosine")
    assert (result["batch_size"], result["steps_per_chunk"], result["timed_steps"]) == (8, 4, 12)
    assert result["images_per_s"] > 0


def test_step_profile_names_the_ops(tmp_path_factory, tmp_path):
    # The article's U-Net at batch 2: every convolution of the step is found in the trace and named.
    result = run_json(cli_env(tmp_path_factory), tmp_path, "benchmarks/step_profile.py", "--batch", "2",
                      "--steps", "1", "--no-torch")
    categories = result["ddpm_jax"]["op_ms_by_category"]
    for expected in ("convolutions, stride 1 / forward", "convolutions, stride 1 / backward",
                     "LayerNorm / forward", "SiLU / forward"):
        assert categories.get(expected, 0) > 0, categories
    assert not any("strided" in name for name in categories), categories  # no dilated convolution is left
