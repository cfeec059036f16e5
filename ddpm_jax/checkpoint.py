"""Checkpoints: one Orbax CheckpointManager under `<workdir>/checkpoints`.

On-disk layout (Orbax's own format; one folder per saved step, no zero padding)::

    <workdir>/checkpoints/<step>/
        _CHECKPOINT_METADATA     Orbax: item handlers, commit timestamp
        state/                   the training-state pytree (OCDBT/Zarr arrays;
                                 `_METADATA` holds the tree structure)
        meta/metadata            JSON: {'config': config.to_dict(), 'epoch': ..., ...}
        metrics/metrics          JSON: {'epoch_loss': x}; only for saves made at
                                 an epoch end with a finite loss

A step folder appears only once it is complete (Orbax writes to
`<step>.orbax-checkpoint-tmp-*` and renames it when the save is finalised).

Retention: the latest `keep` checkpoints, plus the one with the lowest
'epoch_loss' (Orbax preservation policies `LatestN(keep)` OR
`BestN(n=1, lowest epoch_loss)`). Saves without the metric (mid-epoch, early
stop) are never chosen as best, so they never evict it.

Saves are asynchronous: `save()` returns once the arrays are copied to host
memory (the caller may then overwrite/donate its buffers); the files are
written in the background. Call `manager.wait_until_finished()` before reading
them, and close the manager (`manager.close()`, or `with open_manager(...) as
manager:`), which also waits.

Every user-fixable problem (missing path, no checkpoints, corrupt step folder,
state that does not match the checkpoint, unknown `which`) raises `UserError`
with a one-line message; none of these paths deletes or writes anything.

Importing this module drops Orbax's INFO/WARNING log records (absl logging),
which are chatter for this project's CLIs; Orbax errors still show. Call
`orbax_logging(verbose=True)` to see everything again. The first read also
hides the stragglers that a failed read of a corrupt checkpoint leaves behind
(see `_hush_read_stragglers`), so that error stays a one-liner.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from ddpm_jax.config import config_from_dict
from ddpm_jax.errors import UserError

__all__ = [
    "CHECKPOINTS_DIR",
    "WHICH",
    "open_manager",
    "save",
    "latest_step",
    "best_step",
    "restore",
    "read_meta",
    "CorruptCheckpointError",
    "resolve",
    "load_checkpoint",
    "orbax_logging",
]

CHECKPOINTS_DIR = "checkpoints"
WHICH = ("best", "latest")
METRIC = "epoch_loss"
_STATE, _META = "state", "meta"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- logging


class _DropOrbaxChatter(logging.Filter):
    """Drops absl log records below ERROR that come from Orbax's own source files."""

    _marker = f"{os.sep}orbax{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or self._marker not in (record.pathname or "")


_ORBAX_FILTER = _DropOrbaxChatter()


def orbax_logging(verbose: bool) -> None:
    """Show (True) or hide (False, the default on import) Orbax's INFO/WARNING logs."""
    absl_logger = logging.getLogger("absl")
    if verbose:
        absl_logger.removeFilter(_ORBAX_FILTER)
    elif _ORBAX_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_FILTER)


orbax_logging(verbose=False)


class _DropStragglerErrors(logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" for TensorStore reads.

    When one array of a corrupt checkpoint fails to read, Orbax's
    `asyncio.gather` raises the first error (which we translate) and leaves the
    sibling reads' errors unretrieved; asyncio logs each at garbage collection.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(
                ("Future exception was never retrieved", "Task exception was never retrieved")):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not any(s in str(exc) for s in ("tensorstore", "OCDBT", "zarr"))


_hushed_aftermath = False


def _hush_read_stragglers() -> None:
    """Keeps the stragglers of a failed read (reported as UserError) quiet.

    Besides the asyncio log records above, TensorStore callbacks that arrive
    after Orbax closed its event loop raise "RuntimeError: Event loop is
    closed" through `sys.unraisablehook`; both are noise once the error is
    reported. Installed (once) before this module's first read, since they can
    fire while the error is still propagating; only these two are dropped.
    """
    global _hushed_aftermath
    if _hushed_aftermath:
        return
    _hushed_aftermath = True
    logging.getLogger("asyncio").addFilter(_DropStragglerErrors())
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


# --------------------------------------------------------------------------- helpers


def _epoch_loss(metrics: Any) -> float:
    return float(metrics[METRIC])


def _cause(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# What Orbax/TensorStore/json raise on unreadable checkpoints (json.JSONDecodeError
# and TensorStore's errors are ValueErrors; missing files are OSErrors; missing
# items are KeyErrors).
_READ_ERRORS = (OSError, ValueError, KeyError)


def _bad_metrics_files(directory: str) -> list[str]:
    """The step folders' metrics files that are not valid JSON (to name them in errors)."""
    bad = []
    for name in sorted(os.listdir(directory), key=lambda n: (len(n), n)):
        path = os.path.join(directory, name, "metrics", "metrics")
        if name.isdigit() and os.path.isfile(path):
            try:
                with open(path) as fh:
                    json.load(fh)
            except (OSError, ValueError):
                bad.append(path)
    return bad


def _make_manager(
    directory: str,
    *,
    keep: int | None,
    create: bool,
    read_only: bool,
    partial: bool = False,
    read_metrics: bool = True,
) -> ocp.CheckpointManager:
    """The one place that builds CheckpointManagers (training: read_only=False).

    read_metrics=False (read-only only) skips reading every step's metrics at
    start-up; best_step() then knows nothing.
    """
    if read_only:
        options = ocp.CheckpointManagerOptions(
            read_only=True,
            create=False,
            save_interval_steps=0,  # what read_only forces anyway (without the warning)
            best_fn=_epoch_loss,
            best_mode="min",
            lightweight_initialize=not read_metrics,
        )
    else:
        policy = ocp_managers.AnyPreservationPolicy([
            ocp_managers.LatestN(n=keep),
            ocp_managers.BestN(
                get_metric_fn=_epoch_loss,
                reverse=True,  # BestN keeps the *last* n after sorting: descending loss -> lowest
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            create=create,
            # best_fn also makes Orbax write/read the metrics item and answer best_step().
            best_fn=_epoch_loss,
            best_mode="min",
            preservation_policy=policy,
            enable_async_checkpointing=True,
        )
    state_handler = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
    try:
        return ocp.CheckpointManager(
            directory,
            options=options,
            item_handlers={_STATE: state_handler, _META: ocp.JsonCheckpointHandler()},
        )
    except _READ_ERRORS as e:  # Orbax reads every step's metrics file at start-up
        bad = _bad_metrics_files(directory) if os.path.isdir(directory) else []
        culprit = (
            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} corrupt: move "
            f"{'that step folder' if len(bad) == 1 else 'those step folders'} out of {directory}"
            if bad else f"a step folder in {directory} is corrupt: move it out"
        )
        raise UserError(
            f"cannot read the checkpoints in {directory} ({_cause(e)}); {culprit}, "
            "or load another step folder directly"
        ) from e


def _steps_str(manager: ocp.CheckpointManager) -> str:
    steps = manager.all_steps()
    return ", ".join(str(s) for s in steps) if steps else "none"


class CorruptCheckpointError(UserError):
    """A step folder that cannot be read. `step_dir` and `cause` let a caller give its own advice."""

    def __init__(self, message: str, step_dir: str, cause: str):
        super().__init__(message)
        self.step_dir, self.cause = step_dir, cause


def _corrupt(manager: ocp.CheckpointManager, step: int, e: BaseException) -> CorruptCheckpointError:
    _hush_read_stragglers()
    step_dir = os.path.join(str(manager.directory), str(step))
    others = [s for s in manager.all_steps() if s != step]
    hint = (
        f"pass another step folder of {manager.directory} (steps: {', '.join(map(str, others))})"
        if others
        else "no other checkpoint is left there; retrain or restore the folder from a backup"
    )
    return CorruptCheckpointError(f"checkpoint {step_dir} is corrupt or incomplete ({_cause(e)}); {hint}",
                                  step_dir, _cause(e))


def _check_step(manager: ocp.CheckpointManager, step: int) -> None:
    if step not in manager.all_steps():
        raise UserError(
            f"no finished checkpoint for step {step} in {manager.directory} "
            f"(steps there: {_steps_str(manager)}); pick one of those"
        )


def _state_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
    """The saved state's tree of ArrayMetadata (plain nested dicts/lists)."""
    try:
        tree = manager.item_metadata(step)[_STATE]
    except _READ_ERRORS as e:
        raise _corrupt(manager, step, e) from e
    if tree is None:
        raise _corrupt(manager, step, FileNotFoundError("state/_METADATA is missing"))
    return tree.tree if hasattr(tree, "tree") else tree


def _keystr(key: tuple) -> str:
    return ".".join(str(k) for k in key)


def _check_matches(manager: ocp.CheckpointManager, step: int, saved: Any, target: Any) -> None:
    """UserError if `target`'s leaves (paths, shapes) differ from the checkpoint's."""
    have = ocp.tree.to_flat_dict(saved)
    want = ocp.tree.to_flat_dict(target)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shapes = [
        k for k in want
        if k in have and hasattr(have[k], "shape") and hasattr(want[k], "shape")
        and tuple(have[k].shape) != tuple(want[k].shape)
    ]
    if not (missing or extra or shapes):
        return

    def few(keys: list, fmt=_keystr) -> str:
        shown = ", ".join(fmt(k) for k in keys[:3])
        return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"not in the checkpoint: {few(missing)}")
    if extra:
        parts.append(f"only in the checkpoint: {few(extra)}")
    if shapes:
        parts.append("shape differs: " + few(
            shapes, lambda k: f"{_keystr(k)} {tuple(have[k].shape)} vs {tuple(want[k].shape)}"))
    step_dir = os.path.join(str(manager.directory), str(step))
    raise UserError(
        f"checkpoint {step_dir} does not match the state to restore ({'; '.join(parts)}); "
        "resume with the config it was written with, or start a new workdir"
    )


def _to_json(meta: dict) -> dict:
    """`meta` as plain JSON types (numpy/jax scalars -> Python numbers, tuples -> lists)."""
    def default(o):
        if hasattr(o, "tolist"):  # numpy/jax arrays and scalars
            return np.asarray(o).tolist()
        raise TypeError(f"checkpoint meta: {type(o).__name__} is not JSON-serialisable: {o!r}")

    return json.loads(json.dumps(meta, default=default))


def _local_device_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# --------------------------------------------------------------------------- training API


def open_manager(workdir: str, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """The manager of `<workdir>/checkpoints` (created if `create`), keeping the latest `keep` + the best.

    Close it when done (`with open_manager(...) as manager:` or `manager.close()`);
    closing waits for pending asynchronous saves.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise UserError(f"the number of checkpoints to keep must be an integer >= 1, got {keep!r}")
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINTS_DIR)
    if not create and not os.path.isdir(directory):
        raise UserError(f"no checkpoints folder at {directory}; check the workdir path")
    return _make_manager(directory, keep=keep, create=create, read_only=False)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict,
    epoch_loss: float | None = None,
) -> bool:
    """Starts an asynchronous save of `state` + JSON `meta` at `step`; returns whether it saved.

    `epoch_loss` (end-of-epoch saves only) ranks checkpoints for 'best'; None or a
    non-finite loss means "never best". A step at or below the latest saved one
    is skipped (returns False, nothing is written): re-saving the step training
    resumed from is a no-op, and Orbax keeps its step list in save order, so an
    older step would confuse 'latest' and the retention.
    """
    step = int(step)
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError("checkpoint meta must be a dict with a 'config' entry (config.to_dict())")
    latest = manager.latest_step()
    if latest is not None and step <= latest:
        if step == latest or step in manager.all_steps():
            log.info("checkpoint for step %d already exists in %s; not saving it again", step, manager.directory)
        else:
            log.warning(
                "not saving step %d: %s already holds the later step %d", step, manager.directory, latest)
        return False
    metrics = None
    if epoch_loss is not None:
        loss = float(epoch_loss)
        if math.isfinite(loss):
            metrics = {METRIC: loss}
    manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _META: ocp.args.JsonSave(_to_json(meta)),
        }),
        metrics=metrics,
        force=True,  # the decision is ours (above), not Orbax's save-interval policy
    )
    return True


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest saved step, or None."""
    return manager.latest_step()


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The saved step with the lowest epoch_loss, or None if no save had the metric."""
    return manager.best_step()


def restore(manager: ocp.CheckpointManager, step: int, target_state: Any) -> tuple[Any, dict]:
    """(state, meta) of `step`; the state takes `target_state`'s structure, dtypes, shapes and shardings.

    `target_state` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from
    `jax.eval_shape`). Leaves without a sharding get the one they were saved
    with, or the first local device if that one does not exist here.
    """
    step = int(step)
    _hush_read_stragglers()
    manager.wait_until_finished()  # a save of this very step may still be in flight
    _check_step(manager, step)
    _check_matches(manager, step, _state_metadata(manager, step), target_state)
    try:
        out = manager.restore(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(target_state, fallback_sharding=_local_device_sharding()),
                _META: ocp.args.JsonRestore(),
            }),
        )
    except _READ_ERRORS as e:
        raise _corrupt(manager, step, e) from e
    return out[_STATE], dict(out[_META])


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON meta of `step` alone (e.g. its config, to check it before restoring the state)."""
    step = int(step)
    _check_step(manager, step)
    try:
        out = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    except _READ_ERRORS as e:
        raise _corrupt(manager, step, e) from e
    meta = out[_META]
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise _corrupt(manager, step, KeyError("meta has no 'config'"))
    return dict(meta)


# --------------------------------------------------------------------------- sampling API


def resolve(path: str, which: str = "best") -> tuple[str, int]:
    """(checkpoints dir, step) for a workdir, its checkpoints/ folder, or one checkpoints/<step> folder.

    `which` is 'best' (lowest epoch_loss; the latest when no save had the metric)
    or 'latest'; an explicit step folder ignores it.
    """
    if which not in WHICH:
        raise UserError(f"unknown checkpoint choice {which!r}; use 'best' or 'latest'")
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise UserError(
            f"checkpoint path {full} does not exist; pass a workdir, its checkpoints/ folder "
            "or one checkpoints/<step> folder")
    if not os.path.isdir(full):
        raise UserError(
            f"checkpoint path {full} is a file; pass a workdir, its checkpoints/ folder "
            "or one checkpoints/<step> folder")
    if os.path.isdir(os.path.join(full, CHECKPOINTS_DIR)):
        directory = os.path.join(full, CHECKPOINTS_DIR)
    elif os.path.basename(full).isdigit():
        return os.path.dirname(full), int(os.path.basename(full))
    else:
        directory = full
    manager = _make_manager(directory, keep=None, create=False, read_only=True, read_metrics=which == "best")
    try:
        latest = manager.latest_step()
        if latest is None:
            raise UserError(
                f"no checkpoints in {directory}; pass a workdir that has been trained, "
                "its checkpoints/ folder or one checkpoints/<step> folder")
        step = manager.best_step() if which == "best" else None
        return directory, latest if step is None else step
    finally:
        manager.close()


def load_checkpoint(path: str, which: str = "best") -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, params, meta) from a checkpoint, for sampling: no target tree, no optimizer state read.

    `path`/`which` as in `resolve()`. `config` is rebuilt from the stored JSON
    (JSON has no tuples: tuple fields come back as lists). `params` is the
    saved state['params'] as jax arrays on the first local device, i.e. what
    goes into `model.apply({'params': params}, ...)`. `meta` is the stored JSON
    dict plus 'checkpoint_step' (the step loaded), 'checkpoint_dir' (its folder) and, only if
    the state has them, 'ema_params' (same form as `params`).
    """
    directory, step = resolve(path, which)
    _hush_read_stragglers()
    if not os.path.isdir(directory):  # an explicit step folder whose parent vanished
        raise UserError(f"checkpoints folder {directory} does not exist")
    manager = _make_manager(directory, keep=None, create=False, read_only=True, partial=True, read_metrics=False)
    try:
        _check_step(manager, step)
        saved = _state_metadata(manager, step)
        if not isinstance(saved, dict) or "params" not in saved:
            raise _corrupt(manager, step, KeyError("the saved state has no 'params'"))
        wanted = {k: saved[k] for k in ("params", "ema_params") if k in saved}
        sharding = _local_device_sharding()
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), wanted)
        try:
            out = manager.restore(
                step,
                args=ocp.args.Composite(**{
                    _STATE: ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True),
                    _META: ocp.args.JsonRestore(),
                }),
            )
        except _READ_ERRORS as e:
            raise _corrupt(manager, step, e) from e
        state, meta = out[_STATE], out[_META]
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise _corrupt(manager, step, KeyError("meta has no 'config'"))
    finally:
        manager.close()
    meta = dict(meta)
    config = config_from_dict(meta["config"])
    meta["checkpoint_step"] = step
    meta["checkpoint_dir"] = os.path.join(directory, str(step))
    if "ema_params" in state:
        meta["ema_params"] = state["ema_params"]
    return config, state["params"], meta
