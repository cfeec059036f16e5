"""Shared bits of the benchmark scripts: timing, memory, device, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time

import jax

# (size, in, out): count of the article U-Net's 3x3 stride-1 convolutions of that shape
# (ddpm_jax/models/article_unet.py: three levels down, the middle, three up, conv_out).
ARTICLE_CONV3 = {
    (28, 1, 10): 1, (28, 10, 10): 10, (28, 20, 10): 1, (28, 10, 1): 1,
    (14, 10, 20): 1, (14, 20, 20): 6, (14, 40, 20): 1, (14, 20, 10): 1, (14, 10, 10): 3,
    (7, 20, 40): 1, (7, 40, 40): 6, (7, 80, 40): 1, (7, 40, 20): 1, (7, 20, 20): 3,
    (3, 40, 20): 1, (3, 20, 20): 3, (3, 20, 40): 1, (3, 40, 40): 1,
}

def timed(fn):
    """(result, seconds) of fn(), waiting for the device to finish."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def call_seconds(call, repeats: int, warmups: int = 1) -> list[float]:
    """Wall times of `repeats` calls of call() (which waits for its result), after `warmups` untimed
    ones (compile, warm-up)."""
    for _ in range(warmups):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


_compile_seconds = [0.0]
# JAX's duration events for tracing, lowering and compiling a program (jax/_src/dispatch.py).
_COMPILE_EVENTS = frozenset(f"/jax/core/compile/{stage}_duration"
                            for stage in ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile"))


def _count_compile(event: str, seconds: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling so far (JAX's own events)."""
    return _compile_seconds[0]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mib() -> float | None:
    """Peak memory in use on the first device so far, MiB (accelerators; None on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None


def device_info() -> dict:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
            "device_peak_mib": device_peak_mib(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
            # the process settings of ddpm_jax/runtime.py in effect (DDPM_JAX_CPU_TUNING=off: none)
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def median(values) -> float:
    return float(statistics.median(values))


def report(result: dict, json_path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
