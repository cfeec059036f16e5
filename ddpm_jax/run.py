"""The training run: `train_and_evaluate(config, workdir)`, resumable, exact on resume.

What a run writes under `workdir`:
    checkpoints/<step>/   Orbax checkpoints: the latest few, the best by epoch loss,
                          one at every epoch end and at any early stop
    metrics.jsonl         one JSON line per epoch: epoch, step, loss, seconds, images/s
    first_batch.png       the first training batch (as the article shows it)
    forward.png           that batch and its noised versions at 25/50/75/100 % of T
    samples/epoch_NNN.png a grid of samples every `train.sample_every_epochs` epochs

Everything a step does depends only on the seed and the step number (see
training.py), so a run stopped anywhere -- Ctrl-C, max_steps, kill -9 -- and
rerun on the same workdir ends with exactly the parameters of a run that was
never stopped.
"""

from __future__ import annotations

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
from ddpm_jax.data import load_split, to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.models import create_model
from ddpm_jax.sampling import sample, sample_keys
from ddpm_jax.schedule import make_schedule, q_sample
from ddpm_jax.training import (TrainState, create_optimizer, create_train_state, epoch_permutation, run_keys,
                               train_chunk)


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
                             ("train.sample_every_epochs", t.sample_every_epochs, 0)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"--config.{name} must be an integer >= {low}, got {value!r}")


def _checkpoint_tree(state: TrainState, root_key: jax.Array) -> dict:
    """What a checkpoint stores of the state: the schedule is rebuilt from the config,
    every random stream is derived from the root key."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(root_key)}


def _trim_metrics(path: str, last_step: int) -> None:
    """Drops epoch records past the checkpoint a run resumes from: they will be logged again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(records)


class _StopRequest:
    """Turns the first Ctrl-C into a request to save and stop after the current chunk."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint and stopping (press again to abort without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (or resumes training) the model `config` describes; returns a summary dict."""
    check_train_config(config)
    workdir = prepare_workdir(workdir)
    images, _ = load_split(config.data.name, "train", data_dir=config.data.data_dir,
                           manual_dir=config.data.manual_dir)
    num_examples, image_shape = images.shape[0], tuple(images.shape[1:])
    batch_size = config.train.batch_size
    # Each epoch is num_examples // batch_size full batches of a fresh permutation;
    # the remainder (96 images for 60,000 / 128) is left out of that epoch.
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch size {batch_size} is larger than the {num_examples} training images; "
                        "lower --config.train.batch_size")
    total_steps = steps_per_epoch * config.train.num_epochs
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)

    schedule = make_schedule(config.diffusion)
    model = create_model(config, image_shape)
    root_key = jax.random.key(config.seed)
    keys = run_keys(root_key)
    state = create_train_state(model, schedule, create_optimizer(config.optim), keys["init"], image_shape)
    config_dict = config.to_dict()
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    manager = checkpoint.open_manager(workdir, keep=config.train.keep_checkpoints)
    try:
        best_loss, epoch_loss_sum = math.inf, 0.0
        start = checkpoint.latest_step(manager)
        if start is not None:
            saved_meta = checkpoint.read_meta(manager, start)
            diffs = run_defining_differences(saved_meta["config"], config_dict)
            if diffs:
                raise UserError(f"{workdir} holds a run with a different config ({'; '.join(diffs)}); "
                                "use another --workdir or the same settings")
            tree, meta = checkpoint.restore(manager, start, _checkpoint_tree(state, root_key))
            state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
            root_key = jax.random.wrap_key_data(tree["rng"])
            keys = run_keys(root_key)
            best_loss = meta["best_loss"] if meta.get("best_loss") is not None else math.inf
            epoch_loss_sum = meta["epoch_loss_sum"]
            _trim_metrics(metrics_path, start)
            print(f"Resuming from step {start} (epoch {start // steps_per_epoch + 1}) in {workdir}")
        step = int(state.step)

        device_images = jnp.asarray(images)  # uint8 on the device: 47 MB for 60,000 28x28 images
        order = epoch_permutation(keys["data"], step // steps_per_epoch, num_examples)
        if step == 0:
            _write_start_pictures(workdir, images, order, schedule, batch_size, keys["sample"])

        def save(epoch_loss=None):
            meta = {"config": config_dict, "image_shape": list(image_shape), "epoch": step // steps_per_epoch,
                    "step_in_epoch": step % steps_per_epoch, "epoch_loss_sum": epoch_loss_sum,
                    "best_loss": None if math.isinf(best_loss) else best_loss}
            checkpoint.save(manager, step, _checkpoint_tree(state, root_key), meta, epoch_loss=epoch_loss)

        stop_reason = "finished" if step >= total_steps else None
        chunk = config.train.steps_per_chunk
        every = config.train.checkpoint_every_steps
        bar = None
        with _StopRequest() as stop:
            epoch_start, epoch_steps_run = time.time(), 0
            while step < total_steps:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                if bar is None:
                    bar = tqdm(total=steps_per_epoch, initial=in_epoch, leave=False, unit="step",
                               desc=f"Epoch {epoch + 1}/{config.train.num_epochs}", disable=not config.train.progress)
                # Chunks end on multiples of steps_per_chunk and checkpoint_every_steps and
                # never cross an epoch or max_steps, whatever step the run started from.
                n = min(chunk - step % chunk, every - step % every, steps_per_epoch - in_epoch, total_steps - step)
                state, losses = train_chunk(state, device_images, order, in_epoch, keys["train"],
                                            num_steps=n, batch_size=batch_size)
                losses = np.asarray(losses)
                if not np.all(np.isfinite(losses)):
                    bad = step + int(np.argmin(np.isfinite(losses)))
                    good = checkpoint.latest_step(manager)
                    raise UserError(f"the loss became {losses[~np.isfinite(losses)][0]} at step {bad}; "
                                    f"the last good checkpoint (step {good}) is kept; lower "
                                    "--config.optim.learning_rate or check the data")
                step += n
                epoch_steps_run += n
                epoch_loss_sum += float(losses.sum(dtype=np.float64))
                bar.update(n)
                bar.set_postfix(loss=f"{epoch_loss_sum / (in_epoch + n):.4f}")

                if step % steps_per_epoch == 0:  # an epoch ended
                    bar.close()
                    bar = None
                    seconds = time.time() - epoch_start
                    epoch_loss = epoch_loss_sum / steps_per_epoch
                    is_best = epoch_loss < best_loss
                    best_loss = min(best_loss, epoch_loss)
                    epoch_loss_sum = 0.0
                    save(epoch_loss)
                    record = {"epoch": epoch + 1, "step": step, "loss": epoch_loss, "seconds": round(seconds, 2),
                              "images_per_s": round(epoch_steps_run * batch_size / max(seconds, 1e-9), 1)}
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    tqdm.write(f"Loss at epoch {epoch + 1}: {epoch_loss:.3f}" + (" --> Best model ever (stored)"
                                                                                 if is_best else ""))
                    if config.train.sample_every_epochs and (epoch + 1) % config.train.sample_every_epochs == 0:
                        _save_sample_grid(config, model, state, schedule, image_shape, workdir, epoch + 1)
                    if step < total_steps:
                        order = epoch_permutation(keys["data"], step // steps_per_epoch, num_examples)
                    epoch_start, epoch_steps_run = time.time(), 0
                elif step % every == 0:
                    save()

                if stop.requested:
                    stop_reason = "interrupted"
                    break
            if bar is not None:
                bar.close()
        if stop_reason is None:
            stop_reason = "finished" if step >= steps_per_epoch * config.train.num_epochs else "max_steps"
        save()  # a no-op if this step is saved already
        manager.wait_until_finished()
    finally:
        manager.close()

    if stop_reason == "max_steps":
        print(f"Stopped at step {step} (train.max_steps); rerun with a larger --config.train.max_steps "
              "(0 = no cap) to continue")
    elif stop_reason == "interrupted":
        print(f"Interrupted at step {step}; checkpoint saved. Rerun the same command to continue.")
    return {"step": step, "steps_per_epoch": steps_per_epoch, "stop_reason": stop_reason,
            "best_loss": None if math.isinf(best_loss) else best_loss, "workdir": workdir}


def _save_sample_grid(config, model, state, schedule, image_shape, workdir, epoch) -> None:
    key = jax.random.fold_in(run_keys(jax.random.key(config.seed))["sample"], epoch)
    x0, _ = sample(model.apply, {"params": state.params}, schedule, sample_keys(key, 0, config.sample.num),
                   image_shape, sigma=config.sample.sigma)
    viz.save_grid(os.path.join(workdir, "samples", f"epoch_{epoch:03d}.png"), np.asarray(x0))
