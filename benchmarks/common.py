"""Shared bits of the benchmark scripts: timing, memory, device, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time

import jax


def timed(fn):
    """(result, seconds) of fn(), waiting for the device to finish."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_info() -> dict:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__}


def median(values) -> float:
    return float(statistics.median(values))


def report(result: dict, json_path: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
