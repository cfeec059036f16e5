"""Data parallelism on 4 simulated CPU devices (the XLA flag must precede JAX's start: a subprocess)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from cli_helpers import finished, ok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


def test_data_parallel_matches_one_device_and_checkpoints_move_between_meshes():
    result = ok(subprocess.run([sys.executable, "tests/parallel_check.py"], cwd=ROOT,
                               env={**os.environ, **FOUR_DEVICES}, capture_output=True, text=True, timeout=600))
    assert "parallel checks passed" in result.stdout


def _losses(stdout: str) -> list:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("losses "))[len("losses "):])


def test_two_processes_over_jax_distributed_match_one_process():
    with socket.socket() as sock:  # a free port on the loopback for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "tests/parallel_check.py", str(pid), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    try:
        outputs = [ok(finished(proc, timeout=300)).stdout for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    single = ok(subprocess.run([sys.executable, "tests/parallel_check.py", "single"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300))
    reference = _losses(single.stdout)
    for out in outputs:
        np.testing.assert_allclose(_losses(out), reference, rtol=1e-5)
