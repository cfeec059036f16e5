"""The benchmark scripts run and print what they promise (tiny work: a smoke test, no timings asserted).

The scripts run side by side in one fixture (compiling is mostly single-threaded)."""

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import cli_env, finished

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "sample_throughput": ["benchmarks/sample_throughput.py", "--config", "configs/tiny.py", "--num", "2",
                          "--repeats", "1", "--config.sample.sampler=ddim", "--config.sample.steps=3"],
    # Warm-up and decay need the run's planned steps (the fast configs'); tiny: 8 steps an epoch.
    "train_throughput": ["benchmarks/train_throughput.py", "--config", "configs/tiny.py", "--steps", "3",
                         "--num_examples", "64", "--config.optim.warmup_steps=5", "--config.optim.decay=cosine"],
    # The article's U-Net at batch 2: every convolution of the step is found in the trace and named.
    "step_profile": ["benchmarks/step_profile.py", "--batch", "2", "--steps", "1", "--no-torch"],
    "elementwise": ["benchmarks/elementwise.py", "--batch", "2", "--rounds", "1"],
    "conv_kernel": ["benchmarks/conv_kernel.py", "--batch", "2", "--repeats", "1"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{name: the script's JSON, or the failed run's output}."""
    env, out = cli_env(tmp_path_factory), tmp_path_factory.mktemp("benchmarks")
    procs = {name: subprocess.Popen([sys.executable, *args, "--json", str(out / f"{name}.json")], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in RUNS.items()}
    done = {}
    for name, proc in procs.items():
        result = finished(proc)
        done[name] = json.loads((out / f"{name}.json").read_text()) if result.returncode == 0 else result.stderr
    return done


def result_of(results, name) -> dict:
    assert isinstance(results[name], dict), results[name]
    return results[name]


def test_sample_throughput(results):
    result = result_of(results, "sample_throughput")
    assert (result["sampler"], result["steps"], result["n_steps"], result["num_samples"]) == ("ddim", 3, 50, 2)
    assert result["images_per_s"] > 0


def test_train_throughput_with_a_learning_rate_schedule(results):
    result = result_of(results, "train_throughput")
    assert (result["batch_size"], result["steps_per_chunk"], result["timed_steps"]) == (8, 4, 12)
    assert result["images_per_s"] > 0


def test_step_profile_names_the_ops(results):
    categories = result_of(results, "step_profile")["ddpm_jax"]["op_ms_by_category"]
    for expected in ("convolutions, stride 1 / forward", "convolutions, stride 1 / backward",
                     "LayerNorm / forward", "SiLU / forward"):
        assert categories.get(expected, 0) > 0, categories
    assert not any("strided" in name for name in categories), categories  # no dilated convolution is left


def test_elementwise_times_xla_and_the_kernels(results):
    from ddpm_jax.models import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no CPU kernels here (no C++ compiler)")
    times = result_of(results, "elementwise")["ms_per_million_elements"]
    for name in ("silu 2x28x28x10 xla", "silu 2x28x28x10 kernel", "silu(x + bias) 2x28x28x10 kernel",
                 "layer_norm 2x28x28x10 forward+backward kernel"):
        assert times[name]["min"] > 0, times


def test_conv_kernel_times_every_3x3_layer(results):
    from ddpm_jax.models import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no CPU kernels here (no C++ compiler)")
    result = result_of(results, "conv_kernel")
    assert len(result["layers"]) == 18 and sum(row["count"] for row in result["layers"]) == 43, result["layers"]
    assert all(row["forward_ms"] > 0 and row["kernel_grad_ms"] > 0 for row in result["layers"]), result["layers"]
    assert result["model_total"]["kernel_grad_ms"] > 0
