"""Checkpoints: one Orbax CheckpointManager under `<workdir>/checkpoints`.

Each saved step is Orbax's own folder `<workdir>/checkpoints/<step>/` with the items `state`
(the training-state pytree), `meta` (JSON: {'config': config.to_dict(), 'epoch', ...}) and, for
saves at an epoch end, `metrics` ({'epoch_loss': x}). Orbax writes a step to a temporary folder
and renames it once complete, and deletes old steps only after that, so a crash or a full disk
mid-save leaves the earlier checkpoints as they were. Kept: the latest `keep` steps plus the one
with the lowest epoch loss. Saves are asynchronous: close the manager (`with open_manager(...)`)
or call `manager.wait_until_finished()` before reading the files.

A checkpoint that Orbax cannot read raises `CheckpointError` (a UserError: one line
naming the step folder). Errors of a background save (e.g. a full disk) surface from
the manager's next `save`, `wait_until_finished` or `close`; `cli.run` reports them.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ddpm_jax.config import config_from_dict
from ddpm_jax.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
WHICH = ("best", "latest")
METRIC = "epoch_loss"
_PATHS = "pass a workdir, its checkpoints/ folder or one checkpoints/<step> folder"


class CheckpointError(UserError):
    """Orbax could not read a checkpoint (damaged, incomplete, or not this state's structure)."""


@contextlib.contextmanager
def _reading(path: str, advice: str = ""):
    """Turns what Orbax, TensorStore or json raise on an unreadable `path` into one CheckpointError."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        cause = " ".join(str(e).split(" [tensorstore_spec=")[0].split())  # without TensorStore's spec dump
        cause = cause if len(cause) <= 200 else cause[:197] + "..."
        advice = advice or (f"if it is damaged, move that folder out of {os.path.dirname(path)} to use the "
                            "checkpoint before it, or pass another step folder")
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {cause}); {advice}") from e


def _epoch_loss(metrics: dict) -> float:
    return metrics[METRIC]


def _manager(directory: str, keep: int | None = None) -> ocp.CheckpointManager:
    """A training manager (keep the latest `keep` + the best), or a read-only one (keep=None)."""
    if keep is None:
        options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, best_fn=_epoch_loss,
                                               best_mode="min")
    else:
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            # BestN keeps the last n after sorting: reverse=True sorts by descending loss.
            checkpoint_managers.BestN(get_metric_fn=_epoch_loss, reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False),
        ])
        # cleanup_tmp_directories: drop what a failed or killed save left behind.
        options = ocp.CheckpointManagerOptions(best_fn=_epoch_loss, best_mode="min", preservation_policy=policy,
                                               cleanup_tmp_directories=True)
    # Reading takes a part of the state (load_checkpoint), which needs the PyTree handler.
    state_handler = ocp.PyTreeCheckpointHandler() if keep is None else ocp.StandardCheckpointHandler()
    with _reading(directory, "one of its step folders is damaged: move it out"):  # Orbax reads all metrics here
        return ocp.CheckpointManager(directory, options=options,
                                     item_handlers={"state": state_handler, "meta": ocp.JsonCheckpointHandler()})


def open_manager(workdir: str, *, keep: int = 3) -> ocp.CheckpointManager:
    """The manager of `<workdir>/checkpoints` (created), keeping the latest `keep` steps + the best.

    Close it when done (`with open_manager(...) as manager:`); closing waits for pending saves.
    """
    return _manager(os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINTS_DIR), keep)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest saved step, or None."""
    return manager.latest_step()


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, epoch_loss: float | None = None) -> bool:
    """Starts an asynchronous save of `state` + the JSON-serialisable `meta` at `step`.

    `epoch_loss` (end-of-epoch saves) ranks checkpoints for 'best'; None or a non-finite
    loss never makes a step the best. A step at or below the latest saved one is skipped
    (returns False): re-saving the step a run resumed from is a no-op.
    """
    latest = manager.latest_step()
    if latest is not None and step <= latest:
        return False
    finite = epoch_loss is not None and math.isfinite(epoch_loss)
    manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 metrics={METRIC: float(epoch_loss)} if finite else None, force=True)
    return True


def _restore(manager: ocp.CheckpointManager, step: int, **items) -> dict:
    step_dir = os.path.join(str(manager.directory), str(step))
    manager.wait_until_finished()  # a save of this very step may still be in flight
    with _reading(step_dir):
        return manager.restore(step, args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, step: int, target_state: Any) -> tuple[Any, dict]:
    """(state, meta) of `step`; the state takes `target_state`'s structure, dtypes and shardings.

    `target_state` may hold arrays or `jax.ShapeDtypeStruct`s. Leaves without a sharding take
    the saved one, or the first local device when those devices are not here.
    """
    out = _restore(manager, step, meta=ocp.args.JsonRestore(),
                   state=ocp.args.StandardRestore(target_state, fallback_sharding=_here()))
    return out["state"], dict(out["meta"])


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON meta of `step` alone (e.g. its config, to compare before restoring the state)."""
    return dict(_restore(manager, step, meta=ocp.args.JsonRestore())["meta"])


def _here() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def resolve(path: str, which: str = "best") -> tuple[str, int]:
    """(checkpoints folder, step) for a workdir, its checkpoints/ folder or one checkpoints/<step> folder.

    `which`: 'best' (lowest epoch loss; the latest when no save had one) or 'latest';
    an explicit step folder ignores it.
    """
    if which not in WHICH:
        raise UserError(f"unknown checkpoint choice {which!r}; use 'best' or 'latest'")
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(full):
        raise UserError(f"checkpoint path {full} {'is a file' if os.path.exists(full) else 'does not exist'}; {_PATHS}")
    if os.path.basename(full).isdigit():
        return os.path.dirname(full), int(os.path.basename(full))
    if os.path.isdir(os.path.join(full, CHECKPOINTS_DIR)):
        full = os.path.join(full, CHECKPOINTS_DIR)
    with _manager(full) as manager:
        best = manager.best_step() if which == "best" else None
        step = manager.latest_step() if best is None else best
    if step is None:
        raise UserError(f"no checkpoints in {full}; {_PATHS} of a run that has saved one")
    return full, step


def load_checkpoint(path: str, which: str = "best") -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, params, meta) of a checkpoint, for sampling; the optimizer state is not read.

    `path`, `which`: as in `resolve`. `params` (the saved state['params']) are jax arrays
    on the first local device. `meta` is the saved JSON plus 'checkpoint_step',
    'checkpoint_dir' and, when the run kept an EMA, 'ema_params' (like `params`).
    """
    directory, step = resolve(path, which)
    step_dir = os.path.join(directory, str(step))
    with _manager(directory) as manager:
        with _reading(step_dir):
            saved = manager.item_metadata(step)["state"]  # the tree of shapes and dtypes
            if saved is None:
                raise FileNotFoundError("the state's metadata is missing")
            target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_here()), saved[k])
                      for k in ("params", "ema_params") if k in saved}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = _restore(manager, step, meta=ocp.args.JsonRestore(),
                       state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True))
    state, meta = out["state"], dict(out["meta"])
    meta.update(checkpoint_step=step, checkpoint_dir=step_dir)
    if "ema_params" in state:
        meta["ema_params"] = state["ema_params"]
    with _reading(step_dir):
        return config_from_dict(meta["config"]), state["params"], meta
