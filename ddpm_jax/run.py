"""The training run: `train_and_evaluate(config, workdir)`, resumable, exact on resume.

What a run writes under `workdir`:
    checkpoints/<step>/   Orbax checkpoints: the latest few, the best by epoch loss,
                          one at every epoch end and at any early stop
    metrics.jsonl         a JSON line every train.log_every_steps (step, loss, lr, grad_norm,
                          images_per_s: means since the line before) and one per epoch
                          (epoch, step, loss, seconds, images_per_s)
    loss.png              the loss curve, and the loss per t-bucket of the final weights
    first_batch.png       the first training batch (as the article shows it)
    forward.png           that batch and its noised versions at 25/50/75/100 % of T
    samples/epoch_NNN.png a grid of samples every `train.sample_every_epochs` epochs
    samples/step_NNNNNNN.png  and every `train.sample_every_steps` steps
    tensorboard/          with train.tensorboard: the chunk lines' scalars, the epoch loss,
                          the config (hparams) and the step sample grids

Everything a step does depends only on the seed and the step number (see
training.py), so a run stopped anywhere -- Ctrl-C, SIGTERM, max_steps, kill -9 -- and
rerun on the same workdir ends with exactly the parameters of a run that was
never stopped.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ddpm_jax import checkpoint, viz
from ddpm_jax.config import run_defining_differences
from ddpm_jax.data import load_config_split, to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.models import create_model
from ddpm_jax.parallel import batch_sharding, check_divisible, initialize_distributed, make_mesh, replicated
from ddpm_jax.sampling import SampleOptions, sample, sample_keys
from ddpm_jax.schedule import make_schedule, q_sample
from ddpm_jax.runtime import release_free_host_memory
from ddpm_jax.training import (TrainState, compile_train_chunk, create_optimizer, create_train_state,
                               epoch_permutation, learning_rate, learning_rate_at, loss_per_t, run_keys,
                               train_chunk)

PLACEMENTS = ("auto", "device", "stream")


def prepare_workdir(workdir: str) -> str:
    """The absolute workdir, created and checked writable (UserError otherwise)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to workdir {workdir} ({e.strerror or e}); pass --workdir a folder you can write")
    return workdir


def check_train_config(config) -> None:
    t = config.train
    for name, value, low in (("train.batch_size", t.batch_size, 1), ("train.num_epochs", t.num_epochs, 0),
                             ("train.max_steps", t.max_steps, 0), ("train.steps_per_chunk", t.steps_per_chunk, 1),
                             ("train.checkpoint_every_steps", t.checkpoint_every_steps, 1),
                             ("train.keep_checkpoints", t.keep_checkpoints, 1),
                             ("train.sample_every_epochs", t.sample_every_epochs, 0),
                             ("train.sample_every_steps", t.sample_every_steps, 0),
                             ("train.log_every_steps", t.log_every_steps, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"--config.{name} must be an integer >= {low}, got {value!r}")
    if not t.max_minutes >= 0:
        raise UserError(f"--config.train.max_minutes must be >= 0 (0 = no limit), got {t.max_minutes!r}")
    if config.data.placement not in PLACEMENTS:
        raise UserError(f"--config.data.placement must be one of {', '.join(PLACEMENTS)}, "
                        f"got {config.data.placement!r}")
    check_sample_config(config)
    m = config.model
    if not isinstance(m.num_classes, int) or m.num_classes < 0:
        raise UserError(f"--config.model.num_classes must be an integer >= 0, got {m.num_classes!r}")


def check_sample_config(config) -> None:
    """The `config.sample` fields, checked once (sample.py's flags override them)."""
    SampleOptions.from_config(config.sample).validate(config.diffusion.n_steps)
    if not isinstance(config.sample.num, int) or config.sample.num < 1:
        raise UserError(f"--config.sample.num must be an integer >= 1, got {config.sample.num!r}")


def _checkpoint_tree(state: TrainState, root_key: jax.Array) -> dict:
    """What a checkpoint stores of the state: the schedule is rebuilt from the config,
    every random stream is derived from the root key."""
    tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(root_key)}
    if state.ema_params is not None:
        tree["ema_params"] = state.ema_params
    return tree


def _trim_metrics(path: str, last_step: int) -> None:
    """Keeps the epoch records up to the step a run (re)starts from: later ones will be
    logged again. Rewritten atomically; a torn last line (a kill mid-write) is dropped."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class _StopRequest:
    """Turns the first Ctrl-C or SIGTERM (what schedulers, `timeout` and `docker stop` send)
    into a request to save and stop after the current chunk; `signal` records which."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handler(self, signum, frame):
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint and stopping "
                   "(send it again to abort without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _write_start_pictures(workdir, images, order, schedule, batch_size, key) -> None:
    """The article's first pictures: the first batch, and it noised at 25/50/75/100 % of T."""
    first = images[np.asarray(order[:batch_size])]
    viz.save_grid(os.path.join(workdir, "first_batch.png"), first)
    x0 = to_model_range(first)
    noised = []
    for i, fraction in enumerate((0.25, 0.5, 0.75, 1.0)):
        t = jnp.full((x0.shape[0],), int(fraction * schedule.n_steps) - 1)
        noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape)
        noised.append(np.asarray(q_sample(schedule, x0, t, noise)))
    viz.save_forward(os.path.join(workdir, "forward.png"), np.asarray(x0), noised)


def _check_same_run(manager, config_dict: dict, workdir: str) -> None:
    """Refuses a workdir whose latest checkpoint was made with other run-defining settings."""
    latest = checkpoint.latest_step(manager)
    if latest is None:
        return
    diffs = run_defining_differences(checkpoint.read_meta(manager, latest)["config"], config_dict)
    if diffs:
        raise UserError(f"{workdir} holds a run with a different config ({'; '.join(diffs)}); "
                        "use another --workdir or the same settings")


def _resume(manager, state: TrainState, root_key):
    """Restores the latest checkpoint, if any: (state, root_key, best_loss, epoch_loss_sum)."""
    latest = checkpoint.latest_step(manager)
    if latest is None:
        return state, root_key, math.inf, 0.0
    tree, meta = checkpoint.restore(manager, latest, _checkpoint_tree(state, root_key))
    state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"],
                          ema_params=tree.get("ema_params"))
    best_loss = meta["best_loss"] if meta.get("best_loss") is not None else math.inf
    return state, jax.random.wrap_key_data(tree["rng"]), best_loss, meta["epoch_loss_sum"]


@jax.jit
def _all_finite(tree) -> jnp.ndarray:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes training) the model `config` describes; returns a summary dict:
    {'step', 'steps_per_epoch', 'stop_reason' ('finished' | 'max_steps' | 'max_minutes' | 'interrupted'),
    'signal' (the signal number that interrupted it, else None), 'best_loss', 'workdir'}."""
    check_train_config(config)
    deadline = time.monotonic() + 60 * config.train.max_minutes if config.train.max_minutes else math.inf
    initialize_distributed(config.distributed)
    mesh = make_mesh()
    check_divisible(config.train.batch_size, mesh)
    workdir = prepare_workdir(workdir)
    config_dict = config.to_dict()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    batch_size, chunk = config.train.batch_size, config.train.steps_per_chunk
    every = config.train.checkpoint_every_steps

    manager = checkpoint.open_manager(workdir, keep=config.train.keep_checkpoints)
    writer = None
    try:
        _check_same_run(manager, config_dict, workdir)  # before the data: it may be another dataset
        images, labels = load_config_split(config.data, "train")
        num_classes = config.model.num_classes
        if num_classes and labels.max() >= num_classes:
            raise UserError(f"the data has labels up to {labels.max()}, more than --config.model.num_classes="
                            f"{num_classes} classes; raise it to {labels.max() + 1}")
        num_examples, image_shape = images.shape[0], tuple(images.shape[1:])
        # Each epoch is num_examples // batch_size full batches of a fresh permutation;
        # the remainder (96 images for 60,000 / 128) is left out of that epoch.
        steps_per_epoch = num_examples // batch_size
        if steps_per_epoch == 0:
            raise UserError(f"batch size {batch_size} is larger than the {num_examples} training images; "
                            "lower --config.train.batch_size")
        planned_steps = steps_per_epoch * config.train.num_epochs
        total_steps = min(planned_steps, config.train.max_steps) if config.train.max_steps else planned_steps

        model = create_model(config, image_shape)
        root_key = jax.random.key(config.seed)
        lr = learning_rate(config.optim, planned_steps)
        d = config.diffusion
        state = create_train_state(model, make_schedule(d), create_optimizer(config.optim, planned_steps),
                                   run_keys(root_key)["init"], image_shape, ema_decay=config.train.ema_decay,
                                   num_classes=num_classes, label_dropout=config.train.label_dropout,
                                   prediction=d.prediction, loss_weighting=d.loss_weighting, snr_gamma=d.snr_gamma,
                                   random_flip=config.data.random_flip)
        state = jax.device_put(state, replicated(mesh))  # restored checkpoints take this sharding too
        release_free_host_memory()  # what compiling the initialisation took
        state, root_key, best_loss, epoch_loss_sum = _resume(manager, state, root_key)
        keys = run_keys(root_key)
        step = int(state.step)
        lead = jax.process_index() == 0  # one host writes the metrics and pictures
        if lead:
            _trim_metrics(metrics_path, step)
        if step:
            print(f"Resuming from step {step} (epoch {step // steps_per_epoch + 1}) in {workdir}")
        writer = _open_tensorboard(os.path.join(workdir, "tensorboard"), step, config_dict) if (
            lead and config.train.tensorboard) else None

        def save(epoch_loss=None):
            if not bool(_all_finite(state.params)):  # the last update of a chunk can overflow
                raise UserError(_nan_message(step, "the parameters became non-finite", manager))
            if writer is not None:  # what is logged up to a checkpoint survives a kill after it
                writer.flush()
            meta = {"config": config_dict, "image_shape": list(image_shape), "epoch": step // steps_per_epoch,
                    "step_in_epoch": step % steps_per_epoch, "epoch_loss_sum": epoch_loss_sum,
                    "best_loss": None if math.isinf(best_loss) else best_loss}
            checkpoint.save(manager, step, _checkpoint_tree(state, root_key), meta, epoch_loss=epoch_loss)

        with _StopRequest() as stop:
            placement = choose_placement(config.data.placement, images.nbytes + (labels.nbytes if num_classes else 0),
                                         jax.local_devices()[0])
            print(_placement_line(images, placement, config.data.placement))
            data = _ChunkData(images, labels if num_classes else None, placement, replicated(mesh), keys["data"],
                              batch_size, steps_per_epoch, chunk)
            split = batch_sharding(mesh) if mesh.size > 1 else None
            if step == 0 and lead:
                _write_start_pictures(workdir, images, data.order(0), state.schedule, batch_size, keys["sample"])
            del images, labels  # with 'device', the host copies go (47 MB for 60,000 images)
            if step < total_steps:
                # Compile the first chunk's program now and hand the compiler's memory back
                # before the steps allocate theirs: the run's peak memory is lower by ~400 MB.
                n = _chunk_length(step, steps_per_epoch, chunk, total_steps)
                chunk_images, chunk_labels, order, _ = data.chunk(step, n)
                compile_train_chunk(state, chunk_images, order, keys["train"], num_steps=n, batch_size=batch_size,
                                    labels=chunk_labels, batch_sharding=split)
                del chunk_images, chunk_labels, order
                release_free_host_memory()
            bar = None
            epoch_start, epoch_steps_run = time.monotonic(), 0
            log = _ChunkLog(metrics_path if lead else None, batch_size, config.train.log_every_steps, writer)
            chunk_seconds = 0.0
            # The time limit stops before a chunk that would end past it (a chunk takes about the last one's time).
            while step < total_steps and not stop.requested and time.monotonic() + chunk_seconds < deadline:
                chunk_start = time.monotonic()
                epoch, in_epoch = divmod(step, steps_per_epoch)
                if bar is None:
                    bar = tqdm(total=steps_per_epoch, initial=in_epoch, leave=False, unit="step",
                               desc=f"Epoch {epoch + 1}/{config.train.num_epochs}",
                               disable=not (config.train.progress and lead))
                n = _chunk_length(step, steps_per_epoch, chunk, total_steps)
                chunk_images, chunk_labels, order, first_batch = data.chunk(step, n)
                state, metrics = train_chunk(state, chunk_images, order, first_batch, keys["train"], num_steps=n,
                                             batch_size=batch_size, labels=chunk_labels, batch_sharding=split)
                del chunk_images, chunk_labels, order
                if step + n < total_steps:  # while this chunk runs on the device
                    data.send_ahead(step + n, _chunk_length(step + n, steps_per_epoch, chunk, total_steps))
                losses = np.asarray(metrics["loss"])
                if not np.all(np.isfinite(losses)):
                    bad = step + int(np.argmin(np.isfinite(losses))) + 1
                    raise UserError(_nan_message(bad, f"the loss became {losses[~np.isfinite(losses)][0]}", manager))
                step += n
                epoch_steps_run += n
                epoch_loss_sum += float(losses.sum(dtype=np.float64))
                bar.update(n)
                bar.set_postfix(loss=f"{epoch_loss_sum / (in_epoch + n):.4f}")
                log.add(step, losses, np.asarray(metrics["grad_norm"]), learning_rate_at(lr, step))
                sample_every = config.train.sample_every_steps
                if sample_every and step // sample_every > (step - n) // sample_every:  # as checkpoints
                    sampling_start = time.monotonic()
                    grid_key = jax.random.fold_in(jax.random.fold_in(keys["sample"], 2**21), step)
                    x0, cols = _sample_grid(config, model, state, image_shape, grid_key)
                    if lead:
                        viz.save_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"), x0, cols=cols)
                    if writer is not None:
                        writer.write_images(step, {"samples": viz.make_grid(viz.to_uint8(x0), cols=cols)[None]})
                    # images/s counts training only
                    epoch_start += time.monotonic() - sampling_start
                    log.start += time.monotonic() - sampling_start
                chunk_seconds = time.monotonic() - chunk_start
                if step % steps_per_epoch:
                    if step // every > (step - n) // every:  # at the first chunk end past a multiple
                        save()
                    continue

                # An epoch ended: log it, keep the best, start the next one. The record is
                # written before the checkpoint, so a kill in between logs it again on resume.
                bar.close()
                bar = None
                seconds = max(time.monotonic() - epoch_start, 1e-9)
                epoch_loss = epoch_loss_sum / steps_per_epoch
                is_best = epoch_loss < best_loss
                best_loss, epoch_loss_sum = min(best_loss, epoch_loss), 0.0
                if lead:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": epoch_loss,
                                            "seconds": round(seconds, 2),
                                            "images_per_s": round(epoch_steps_run * batch_size / seconds, 1)}) + "\n")
                if writer is not None:
                    writer.write_scalars(step, {"epoch_loss": epoch_loss})
                save(epoch_loss)
                tqdm.write(f"Loss at epoch {epoch + 1}: {epoch_loss:.3f}"
                           + (" --> Best model ever (stored)" if is_best else ""))
                if config.train.sample_every_epochs and (epoch + 1) % config.train.sample_every_epochs == 0:
                    # The pictures' stream; fold_in(., i < 4) noises forward.png, so the grids start past it.
                    x0, cols = _sample_grid(config, model, state, image_shape,
                                            jax.random.fold_in(keys["sample"], 1000 + epoch + 1))
                    if lead:  # every host samples (the program is global), one writes
                        viz.save_grid(os.path.join(workdir, "samples", f"epoch_{epoch + 1:03d}.png"), x0, cols=cols)
                epoch_start, epoch_steps_run = time.monotonic(), 0
            if bar is not None:
                bar.close()
            save()  # the last step is never lost; a no-op if it is saved already
            manager.wait_until_finished()
            if not stop.requested:  # a signal asks to stop soon
                _save_loss_figure(workdir, metrics_path, state, data.head(batch_size), keys["sample"], lead)
    finally:
        manager.close()
        if writer is not None:
            writer.close()

    if step >= planned_steps:
        stop_reason = "finished"
    elif stop.requested:
        stop_reason = "interrupted"
        print(f"Interrupted ({signal.Signals(stop.signal).name}) at step {step}; checkpoint saved. "
              "Rerun the same command to continue.")
    elif step >= total_steps:
        stop_reason = "max_steps"
        print(f"Stopped at step {step} (train.max_steps); rerun with a larger --config.train.max_steps "
              "(0 = no cap) to continue")
    else:
        stop_reason = "max_minutes"
        print(f"Stopped at step {step}: train.max_minutes ({config.train.max_minutes}) is spent; rerun with a larger "
              "--config.train.max_minutes (0 = no limit) to continue")
    return {"step": step, "steps_per_epoch": steps_per_epoch, "stop_reason": stop_reason, "signal": stop.signal,
            "best_loss": None if math.isinf(best_loss) else best_loss, "workdir": workdir}


class _ChunkLog:
    """metrics.jsonl's training lines: at the first chunk end past each multiple of `every`
    steps, the means since the line before (loss, gradient norm), the learning rate and images/s;
    the same values go to TensorBoard through `writer` (a clu MetricWriter, or None)."""

    def __init__(self, path: str | None, batch_size: int, every: int, writer=None):
        self.path, self.batch_size, self.every, self.writer = path, batch_size, every, writer
        self.losses, self.grad_norms, self.start = [], [], time.monotonic()

    def add(self, step: int, losses: np.ndarray, grad_norms: np.ndarray, lr: float) -> None:
        if self.path is None:  # not the host that writes
            return
        self.losses.append(losses)
        self.grad_norms.append(grad_norms)
        if step // self.every == (step - len(losses)) // self.every:
            return
        losses, grad_norms = np.concatenate(self.losses), np.concatenate(self.grad_norms)
        seconds = max(time.monotonic() - self.start, 1e-9)
        record = {"step": step, "loss": float(losses.mean(dtype=np.float64)),
                  "grad_norm": float(grad_norms.mean(dtype=np.float64)), "lr": lr,
                  "images_per_s": round(len(losses) * self.batch_size / seconds, 1)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
        self.losses, self.grad_norms, self.start = [], [], time.monotonic()


def _save_loss_figure(workdir, metrics_path, state, images, key, lead) -> None:
    """loss.png: the logged training loss against the step, and the loss per tenth of
    [0, T) of the final weights on one batch of training `images` (which timesteps are hard)."""
    # The pictures' stream: forward.png folds in 0..3, the epoch grids 1000 + epoch, the step grids 2**21.
    buckets = loss_per_t(state, to_model_range(images), jax.random.fold_in(key, 2**20), num_buckets=10)
    if not lead:  # every host computes (the program is global), one writes
        return
    records = []
    if os.path.exists(metrics_path):  # a run shorter than log_every_steps logged nothing
        with open(metrics_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    curve = [(r["step"], r["loss"]) for r in records if "grad_norm" in r]
    viz.save_loss_figure(os.path.join(workdir, "loss.png"), curve, np.asarray(buckets), state.schedule.n_steps)


def _chunk_length(step: int, steps_per_epoch: int, chunk: int, total_steps: int) -> int:
    """Steps in the chunk that starts at `step`: chunks are `chunk` long, counted from the
    epoch's start, cut short only by the epoch's end and by total_steps (two or three
    shapes to compile)."""
    in_epoch = step % steps_per_epoch
    return min(chunk - in_epoch % chunk, steps_per_epoch - in_epoch, total_steps - step)


def _nan_message(step: int, what: str, manager) -> str:
    good = checkpoint.latest_step(manager)
    kept = f"the last good checkpoint (step {good}) is kept" if good is not None else "no checkpoint was written yet"
    return f"{what} at step {step}; training stopped and {kept}; lower --config.optim.learning_rate or check the data"


def _sample_grid(config, model, state, image_shape, key) -> tuple[np.ndarray, int | None]:
    """config.sample.num samples with the config's sampler, from the EMA weights if there are
    any: float (num, H, W, C), and the grid's columns (a conditional model draws one row per
    class; None: near-square). Every host must call it (the program is global)."""
    keys = sample_keys(key, 0, config.sample.num)
    s, num_classes = config.sample, config.model.num_classes
    cols = -(-s.num // num_classes) if num_classes else None
    labels = jnp.arange(s.num) // cols if num_classes else None
    params = state.ema_params if state.ema_params is not None else state.params
    x0, _ = sample(model.apply, {"params": params}, state.schedule, keys, image_shape,
                   SampleOptions.from_config(s, guidance=s.guidance if num_classes else 0.0), labels=labels,
                   prediction=state.prediction)
    return np.asarray(x0), cols


def choose_placement(placement: str, data_bytes: int, device) -> str:
    """'device' or 'stream' for config.data.placement: 'auto' keeps the training set on the
    device when it takes at most a quarter of the device's memory (always on a CPU, whose
    "device" memory is the host's), else streams it."""
    if placement != "auto":
        return placement
    limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
    return "stream" if limit and data_bytes > limit / 4 else "device"


def _placement_line(images: np.ndarray, placement: str, asked: str) -> str:
    where = ("on the device(s)" if placement == "device"
             else "streamed from the host, chunk by chunk")
    return (f"Training data: {images.shape[0]:,} images of {'x'.join(map(str, images.shape[1:]))} "
            f"({images.nbytes / 1e6:,.0f} MB), {where} (data.placement={asked})")


class _ChunkData:
    """Where a chunk's batches come from, by placement ('device' or 'stream').

    'device': the uint8 set (and labels) sit on the device(s) (`sharding`); a chunk gathers
    its batches there through the epoch's permutation. 'stream': the host gathers the chunk's
    batches, images[order[first * B:(first + n) * B]], into one array and sends it; the chunk
    reads it in order (order = arange). The batches, and so the results, are the same. The
    array always has room for `chunk_steps` batches (a shorter chunk leaves the rest zero), so
    that chunks of every length share one shape (one program for the CPU's loop of steps).
    The next chunk's array is sent (`send_ahead`) while the current one trains.
    """

    def __init__(self, images, labels, placement, sharding, data_key, batch_size, steps_per_epoch, chunk_steps):
        self.stream, self.sharding, self.data_key = placement == "stream", sharding, data_key
        self.batch_size, self.steps_per_epoch, self.num_examples = batch_size, steps_per_epoch, images.shape[0]
        if self.stream:
            self.images, self.labels = images, labels
            self.chunk_rows = batch_size * min(chunk_steps, steps_per_epoch)
            self.chunk_order = jnp.arange(self.chunk_rows, dtype=jnp.int32)
        else:  # uint8 on every device: 47 MB for 60,000 28x28 images; each device takes its slice of a batch
            self.images = jax.device_put(images, sharding)
            self.labels = None if labels is None else jax.device_put(labels, sharding)
        self._order = (None, None)  # (epoch, its permutation)
        self._ahead = (None, None)  # ((step, n), the arrays sent for that chunk)

    def order(self, epoch: int):
        """The epoch's permutation (num_examples,): on the device, or on the host when streaming."""
        if self._order[0] != epoch:
            order = epoch_permutation(self.data_key, epoch, self.num_examples)
            self._order = (epoch, np.asarray(order) if self.stream else order)
        return self._order[1]

    def chunk(self, step: int, n: int):
        """train_chunk's (images, labels, order, first_batch) for the n steps from `step`."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if not self.stream:
            return self.images, self.labels, self.order(epoch), in_epoch
        if self._ahead[0] == (step, n):
            return self._ahead[1]
        rows = self.order(epoch)[in_epoch * self.batch_size:(in_epoch + n) * self.batch_size]

        def gather(array):  # a new array each time: device_put may alias it (CPU) or copy it later
            out = np.zeros((self.chunk_rows, *array.shape[1:]), array.dtype)
            np.take(array, rows, axis=0, out=out[:len(rows)])
            return jax.device_put(out, self.sharding)  # returns at once; the copy overlaps the device's work

        return gather(self.images), None if self.labels is None else gather(self.labels), self.chunk_order, 0

    def send_ahead(self, step: int, n: int) -> None:
        """Starts sending the chunk of n steps from `step` (streaming; a no-op otherwise)."""
        if self.stream:
            self._ahead = ((step, n), self.chunk(step, n))

    def head(self, n: int):
        """The first n training images, uint8 (n, H, W, C)."""
        return self.images[:n] if not self.stream else jax.device_put(self.images[:n], self.sharding)


def _open_tensorboard(logdir: str, step: int, config_dict: dict):
    """A clu summary writer on `logdir`, whose event files keep only what was logged up to
    `step` (the run restarts there and logs the rest again); a fresh run (step 0) starts with
    the config as hparams."""
    from clu import metric_writers  # lazy: clu's summary writer imports TensorFlow (~3 s)

    trim_event_files(logdir, step)
    writer = metric_writers.SummaryWriter(logdir)
    if step == 0:
        writer.write_hparams(config_dict)  # clu flattens it: 'model.channels', 'model.channel_mults.0', ...
    return writer


def trim_event_files(logdir: str, last_step: int) -> None:
    """Drops the events after `last_step` from the TensorBoard event files in `logdir` (all of
    them for last_step 0), as _trim_metrics does for metrics.jsonl; a torn last record (a kill
    mid-write) is dropped too. Each file is rewritten atomically, and only if it changes."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
        if last_step == 0:
            os.remove(path)
            continue
        kept, changed = [], False
        try:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                if event_pb2.Event.FromString(record).step <= last_step:
                    kept.append(record)
                else:
                    changed = True
        except tf.errors.DataLossError:
            changed = True
        if changed:
            tmp = f"{path}.tmp-{os.getpid()}"
            with tf.io.TFRecordWriter(tmp) as f:
                for record in kept:
                    f.write(record)
            os.replace(tmp, path)
