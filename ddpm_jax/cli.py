"""What the CLIs share: process setup (runtime.py), flag parsing, expected errors as one line.

A user's mistake (unknown flag or config key, wrong type, bad path, ...) prints
`error: <what is wrong and what to do>` on stderr and exits with status 2, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from typing import Callable

from absl import flags
from absl import logging as absl_logging

from ddpm_jax import runtime
from ddpm_jax.errors import UserError


# Quiet TensorFlow's C++ logs (tfds imports it to prepare data); must precede its import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# The flags DEFINEd here belong to the CLI that calls define_sample_flags (its --help lists them).
flags.disclaim_key_flags()

SAMPLE_FLAGS = ("sampler", "steps", "spacing", "eta", "sigma", "clip_x0", "guidance")


def define_sample_flags(also: str = "") -> None:
    """The flags of sampling.SampleOptions (sample.py, evaluate.py); each defaults to the
    checkpoint config's value and is checked by SampleOptions.validate. `also` ends the help
    of --sigma and --clip_x0 (evaluate.py: they also choose the model whose bits/dim is measured)."""
    default = " (default: the checkpoint config's)."
    flags.DEFINE_string("sampler", None, "Reverse process: ddpm (Algorithm 2), ddim or dpmpp_2m (DPM-Solver++(2M))"
                        + default)
    flags.DEFINE_integer("steps", None, "Network evaluations, on respaced steps; 0 = all of the model's steps, at "
                         "most its n_steps" + default, lower_bound=0)
    flags.DEFINE_string("spacing", None, "How fewer steps are spread: linear (evenly in t), quadratic (denser near "
                        "t = 0) or logsnr (evenly in log-SNR)" + default)
    flags.DEFINE_float("eta", None, "DDIM noise: 0 = deterministic, 1 = DDPM-like" + default,
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_enum("sigma", None, ["beta", "beta_tilde"], "DDPM reverse-process variance" + also + default)
    flags.DEFINE_bool("clip_x0", None, "Clip the x0 estimate to [-1, 1] at every step" + also + default)
    flags.DEFINE_float("guidance", None, "Conditional models: classifier-free guidance weight w, "
                       "eps = (1 + w) eps(x, y) - w eps(x)" + default, lower_bound=0.0)


def sample_overrides() -> dict:
    """The values of define_sample_flags' flags (None where not given), for SampleOptions.from_config."""
    return {name: getattr(flags.FLAGS, name) for name in SAMPLE_FLAGS}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_output(path: str, overwrite: bool) -> None:
    """Fails before any work if `path` exists (without overwrite) or cannot be created."""
    if os.path.exists(path) and not overwrite:
        fail(f"{path} exists; choose another name or pass --overwrite")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the nearest existing ancestor must be a writable folder
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        fail(f"cannot create {path}: {folder} is not a folder you can write; choose another output path")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: XLA's RESOURCE_EXHAUSTED (a jaxlib XlaRuntimeError /
    JaxRuntimeError, on an accelerator or the host) or Python's MemoryError."""
    if isinstance(e, MemoryError):
        return True
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(names & {"XlaRuntimeError", "JaxRuntimeError"}) and (
        "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e))


def out_of_memory_message(e: BaseException, flag_values=flags.FLAGS) -> str:
    """One line: what ran out, and the flag that makes the batches smaller."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    if len(first) > 160:
        first = first[:157] + "..."
    if "batch" in flag_values:  # sample.py, evaluate.py
        hint = f"a smaller --batch (now {flag_values.batch})"
    elif "config" in flag_values:  # train.py
        config = flag_values.config
        size = getattr(getattr(config, "train", None), "batch_size", None)
        hint = "a smaller --config.train.batch_size" + (f" (now {size})" if size else "")
    else:
        hint = "a smaller batch"
    return f"out of memory ({first}); try {hint}"


def _without_closed_loop_echoes(hook):
    """`hook` minus TensorStore's "Event loop is closed" echoes: when a checkpoint read or write
    fails, Orbax closes its event loop and each array still in flight reports that; the failure
    itself is reported as one line."""
    def quiet(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)
    return quiet


def run(main: Callable[[], None], argv: list[str] | None = None) -> None:
    """Parses the absl flags, then runs main(); expected errors exit 2 with one line.
    The process takes runtime.py's CPU settings first (restarting itself once for them
    when it runs the real command line, argv=None)."""
    runtime.configure(reexec=argv is None)
    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
        for name in list(flags.FLAGS):
            # config_flags reports a config file it could not load only when the
            # config is first used: use it here.
            getattr(getattr(flags.FLAGS, name), "to_dict", None)
    except flags.Error as e:
        fail(f"{_one_line(e)} (see --help)")
    except OSError as e:  # a --config file that cannot be read
        last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        fail(f"could not load the config file: {last}")
    except (KeyError, AttributeError) as e:  # an override naming no field, e.g. --config.train.bogus=1
        detail = e
        while isinstance(detail, BaseException):  # AttributeError(KeyError('name\nDid you mean ...'))
            detail = detail.args[0] if detail.args else ""
        lines = str(detail).splitlines() or [""]
        field = lines[0].strip("'\"")
        given = next((a.split("=")[0] for a in argv if a.startswith("--config.") and field
                      and field in a.split("=")[0].split(".")), None)
        if given is None:
            raise
        hint = lines[1].strip() if len(lines) > 1 else "check the spelling (the fields are in ddpm_jax/config.py)"
        fail(f"{given} names no config field; {hint}")
    # Any other exception while loading a config file is a bug in that file: its traceback helps.
    if len(rest) > 1:
        fail(f"unexpected arguments {' '.join(rest[1:])!r}; every option is a --flag (see --help)")
    runtime.enable_compilation_cache()
    # tfds and Orbax log through absl what says nothing to a user of the CLIs; Orbax also logs
    # every failure it then raises (with tracebacks): the raised error is what is reported.
    absl_logging.set_verbosity(absl_logging.FATAL)
    sys.unraisablehook = _without_closed_loop_echoes(sys.unraisablehook)
    # The writes still queued when such a failure closes the loop are never started; Python
    # warns of each at exit, at random (when the coroutine object is collected).
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    try:
        main()
    except UserError as e:
        fail(_one_line(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError) as e:  # a full disk: Python's OSError or TensorStore's ValueError (Orbax)
        if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
            raise
        fail(f"no space left on device ({_one_line(e).split(' [tensorstore_spec=')[0][:200]}); free some space "
             "and run the command again (a checkpoint being written is discarded, the earlier ones are kept)")
    except Exception as e:  # noqa: BLE001 - only out-of-memory becomes one line; the rest keeps its traceback
        if not is_out_of_memory(e):
            raise
        fail(out_of_memory_message(e))
