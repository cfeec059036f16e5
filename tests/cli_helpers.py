"""What the end-to-end CLI tests share: the subprocess environment and the result checks."""

import os
import subprocess


def cli_env(tmp_path_factory) -> dict:
    """This process's environment, with the CLIs' caches and temp files in pytest folders, on the CPU."""
    env = dict(os.environ)
    cache = tmp_path_factory.getbasetemp() / "xla-cache-shared"  # one for the session: later runs reuse compiles
    cache.mkdir(exist_ok=True)
    env["DDPM_JAX_COMPILE_CACHE"] = str(cache)
    env["JAX_PLATFORMS"] = "cpu"
    env["TFDS_DATA_DIR"] = str(tmp_path_factory.mktemp("tfds"))
    env["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))  # tfds' mock_data leaves an empty temp folder per run
    return env


def finished(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Waits for a process started with text pipes (several run side by side: compiling is mostly
    single-threaded) and returns what subprocess.run would have."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def user_error(result, *words):
    """An expected mistake: exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
