import os
import subprocess
import sys

import jaxlib
import numpy as np

from cli_helpers import finished, ok

from ddpm_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YNN = "--xla_cpu_experimental_ynn_fusion_type"
HEAPS = "--xla_multiheap_size_constraint_per_heap"


def test_xla_flags_added_on_measured_jaxlib_only_and_never_over_the_users():
    defaults = f"{YNN}=-individual_convolution {HEAPS}=8388608"
    assert runtime.xla_flags_with_cpu_defaults("", "0.10.2") == defaults
    assert runtime.xla_flags_with_cpu_defaults("--xla_dump_to=/tmp/d", "0.10.0") == f"--xla_dump_to=/tmp/d {defaults}"
    assert (runtime.xla_flags_with_cpu_defaults(f"{YNN}=+eltwise {HEAPS}=-1", "0.10.2")
            == f"{YNN}=+eltwise {HEAPS}=-1")
    for version in ("0.9.2", "0.11.0", "1.0.0"):  # unknown flags abort XLA: leave other versions alone
        assert runtime.xla_flags_with_cpu_defaults("--a=1", version) == "--a=1"


def test_huge_pages_tunable_joins_the_users_tunables():
    assert runtime.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert runtime.tunables_with_huge_pages("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert runtime.tunables_with_huge_pages("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"


def test_configure_respects_off_and_release_is_harmless():
    environ = {"DDPM_JAX_CPU_TUNING": "off"}
    runtime.configure(reexec=True, environ=environ)
    assert environ == {"DDPM_JAX_CPU_TUNING": "off"}
    runtime.release_free_host_memory()


def _run_checks(tmp_path, *tunings):
    """runtime_check.py under each DDPM_JAX_CPU_TUNING value, the processes side by side (compiling
    is mostly single-threaded): {tuning: its saved arrays}."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    procs = {tuning: subprocess.Popen([sys.executable, "tests/runtime_check.py", str(tmp_path / f"{tuning}.npz")],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**env, "DDPM_JAX_CPU_TUNING": tuning, "PYTHONPATH": "tests"})
             for tuning in tunings}
    for proc in procs.values():
        ok(finished(proc))
    return {tuning: np.load(tmp_path / f"{tuning}.npz") for tuning in tunings}


def test_cpu_settings_compute_the_same_function(tmp_path):
    """The article U-Net's output and every parameter gradient agree with and without the
    settings, which were really in effect (restarted with the tunable, the flag set)."""
    results = _run_checks(tmp_path, "on", "off")
    tuned, plain = results["on"], results["off"]
    assert str(plain["xla_flags"]) == "" and str(plain["glibc_tunables"]) == ""
    if runtime.xla_flags_with_cpu_defaults("", jaxlib.__version__):
        assert YNN in str(tuned["xla_flags"]) and HEAPS in str(tuned["xla_flags"])
    if runtime._huge_pages_available():
        assert "glibc.malloc.hugetlb=1" in str(tuned["glibc_tunables"])
    keys = [k for k in plain.files if k == "out" or k.startswith("grad:")]
    assert len(keys) > 40 and set(keys) <= set(tuned.files)
    for key in keys:
        np.testing.assert_allclose(tuned[key], plain[key], rtol=2e-4, atol=1e-6, err_msg=key)


def test_cpu_backend_is_decided_without_starting_jax():
    never = lambda path: False  # noqa: E731
    always = lambda path: True  # noqa: E731
    assert runtime.expects_cpu_backend({"JAX_PLATFORMS": "cpu"}, plugins={"cuda"}, exists=always)
    assert not runtime.expects_cpu_backend({"JAX_PLATFORMS": "cuda,cpu"}, plugins=set(), exists=never)
    assert not runtime.expects_cpu_backend({"JAX_PLATFORMS": "tpu"}, plugins=set(), exists=never)
    assert runtime.expects_cpu_backend({}, plugins=set(), exists=always)  # no accelerator plugin
    assert not runtime.expects_cpu_backend({}, plugins={"cuda"}, exists=lambda p: p == "/dev/nvidiactl")
    assert runtime.expects_cpu_backend({"JAX_PLATFORMS": ""}, plugins={"cuda"}, exists=never)  # plugin, no GPU
    assert not runtime.expects_cpu_backend({}, plugins={"tpu"}, exists=lambda p: p == "/dev/accel0")
    assert isinstance(runtime._installed_accelerator_plugins(), set)


def test_restart_only_on_the_cpu_backend_and_only_without_the_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(runtime, "_huge_pages_available", lambda: True)
    gpu = {"JAX_PLATFORMS": "cuda"}
    runtime.configure(reexec=True, environ=gpu)  # a GPU process: no restart, no CPU flags
    assert gpu == {"JAX_PLATFORMS": "cuda"}
    monkeypatch.setattr(runtime, "_installed_accelerator_plugins", lambda: {"cuda"})
    monkeypatch.setattr(runtime.os.path, "exists", lambda path: path.startswith("/dev/nvidia"))
    runtime.configure(reexec=True, environ={})  # JAX will pick the GPU: no restart
    runtime.configure(reexec=True, environ={"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    runtime.configure(reexec=True, environ={"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    runtime.configure(reexec=False, environ={"JAX_PLATFORMS": "cpu"})
    assert calls == []
    runtime.configure(reexec=True, environ={"JAX_PLATFORMS": "cpu"})  # the CPU, setting absent: restart
    assert len(calls) == 1 and calls[0][2]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_a_path_based_cuda_plugin_is_found_without_importing_it(tmp_path, monkeypatch):
    import importlib
    import sys

    plugin = tmp_path / "jax_plugins" / "xla_cuda12"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    had = "jax_plugins" in sys.modules
    assert "cuda" in runtime._installed_accelerator_plugins()
    assert "jax_plugins.xla_cuda12" not in sys.modules and ("jax_plugins" in sys.modules) == had
