"""A trained model, loaded from a checkpoint, and samples drawn from it: what sample.py,
evaluate.py and notebooks share.

    trained = load_trained("runs/fashion")            # EMA weights when the run kept them
    x0, frames = generate(trained, num=64, sampler="dpmpp_2m", steps=20)

Every sampling option left at None takes the checkpoint config's `config.sample` value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import jax
import numpy as np

from ddpm_jax.checkpoint import load_checkpoint
from ddpm_jax.errors import UserError
from ddpm_jax.models import create_model
from ddpm_jax.sampling import SampleOptions
from ddpm_jax.schedule import Schedule, make_schedule

WEIGHTS = ("auto", "ema", "raw")


@dataclasses.dataclass(frozen=True)
class Trained:
    """A model and the weights to run it with. params: {'params': ...}, for model.apply."""

    config: object
    model: object
    params: dict
    schedule: Schedule
    image_shape: tuple[int, int, int]
    weights: str  # 'ema' or 'raw': which weights `params` holds
    meta: dict

    @property
    def eps_fn(self):
        return self.model.apply

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    @property
    def prediction(self) -> str:
        """What the network outputs: 'eps' or 'v' (objectives.py)."""
        return self.config.diffusion.prediction


def load_trained(ckpt: str, which: str = "best", weights: str = "auto") -> Trained:
    """The model of a checkpoint (a workdir, its checkpoints/ folder or one step folder).

    which: 'best' (epoch loss) or 'latest'; weights: 'ema', 'raw', or 'auto' (EMA
    when the run kept one, else the raw parameters).
    """
    if weights not in WEIGHTS:
        raise UserError(f"unknown weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    config, params, meta = load_checkpoint(ckpt, which)
    ema = meta.pop("ema_params", None)
    if weights == "ema" and ema is None:
        raise UserError(f"{meta['checkpoint_dir']} has no EMA weights (trained with train.ema_decay = 0); "
                        "use --weights raw")
    use_ema = ema is not None and weights != "raw"
    image_shape = tuple(meta["image_shape"])
    return Trained(config=config, model=create_model(config, image_shape), params={"params": ema if use_ema else params},
                   schedule=make_schedule(config.diffusion), image_shape=image_shape,
                   weights="ema" if use_ema else "raw", meta=meta)


def class_rows(num: int, num_classes: int) -> tuple[np.ndarray, int]:
    """Labels that give one row per class in a grid: (labels (num,), columns)."""
    cols = -(-num // num_classes)
    return np.arange(num) // cols, cols


def sample_options(config, **overrides) -> SampleOptions:
    """The config's `config.sample` options, with the overrides that are not None, validated."""
    return SampleOptions.from_config(config.sample, **overrides).validate(config.diffusion.n_steps)


def generate(trained: Trained, *, num: int, seed: int = 0, labels=None, batch_size: int = 256,
             num_frames: int = 0, frames_for: int = 100, progress: bool = True, mesh=None,
             options: SampleOptions | None = None, start: int = 0, on_batch=None,
             **overrides) -> tuple[np.ndarray, np.ndarray]:
    """Samples start .. num - 1 (and the trajectory of the first `frames_for`), as
    sampling.sample_batched returns them: x0 float32 (num - start, H, W, C), not clipped.
    Sample i uses fold_in(key(seed), i); on_batch(end, x0) sees each finished batch.

    labels: None, or (num,) ints for a conditional model (None there means 'no label').
    options: a SampleOptions (default: the checkpoint config's), updated by the overrides
    that are not None (sampler, steps, sigma, eta, clip_x0, guidance, spacing).
    mesh: a device mesh (parallel.make_mesh) whose devices share each batch.
    """
    from ddpm_jax.parallel import batch_sharding, replicated
    from ddpm_jax.sampling import sample_batched

    overrides = {k: v for k, v in overrides.items() if v is not None}
    options = dataclasses.replace(options, **overrides) if options else sample_options(trained.config, **overrides)
    options.validate(trained.schedule.n_steps)
    if labels is not None and not trained.num_classes:
        raise UserError("this model is unconditional: it takes no labels (train one with --config.model.num_classes)")
    if labels is None:
        options = dataclasses.replace(options, guidance=0.0)  # guidance needs a class to guide towards
    elif np.any((np.asarray(labels) < 0) | (np.asarray(labels) >= trained.num_classes)):
        raise UserError(f"labels must lie in 0 .. {trained.num_classes - 1}")
    params, split = trained.params, None
    if mesh is not None and mesh.size > 1:
        params, split = jax.device_put(params, replicated(mesh)), batch_sharding(mesh)
    return sample_batched(trained.eps_fn, params, trained.schedule, jax.random.key(seed), num, trained.image_shape,
                          options, batch_size=batch_size, labels=labels, num_frames=num_frames,
                          frames_for=frames_for, progress=progress, batch_sharding=split,
                          prediction=trained.prediction, start=start, on_batch=on_batch)


def save_npz(path: str, **arrays) -> None:
    """np.savez to exactly `path` (np.savez given a name would append .npz), atomically: a
    temporary file renamed onto it, so an interrupted write never leaves a truncated file."""
    from ddpm_jax.viz import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def run_settings(trained: Trained, options: SampleOptions, *, seed: int, num: int, labels=None,
                 num_frames: int = 0) -> str:
    """Everything a run's samples depend on, as JSON: kept samples made with other settings are not resumed."""
    return json.dumps({
        "checkpoint_dir": os.path.abspath(str(trained.meta.get("checkpoint_dir"))),
        "checkpoint_step": int(trained.meta.get("checkpoint_step", -1)),
        "weights": trained.weights, "seed": seed, "num": num, "num_frames": num_frames,
        "labels": None if labels is None else hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest(),
        "options": dataclasses.asdict(options),
    }, sort_keys=True)


class PartialSamples:
    """The finished batches of a long sampling run, kept in `path` (rewritten atomically after
    each batch; '' keeps them in memory only) so that an interrupted run resumes: float32
    samples 0 .. done - 1 ('x0'), the GIF frames of samples 0 .. frames_done - 1 as uint8, and
    the `settings` (run_settings) that made them. A file made with other settings, or
    unreadable, is ignored (and replaced). Use `keep` as generate's on_batch."""

    def __init__(self, path: str, settings: str, num: int):
        self.path, self.settings = path, settings
        self.parts, self.frames = [], None
        if path and os.path.isfile(path):
            try:
                with np.load(path, allow_pickle=False) as kept:
                    if str(kept["settings"]) == settings:
                        self.parts = [kept["x0"][:num]]
                        self.frames = kept["frames"] if "frames" in kept.files else None
                    else:
                        print(f"{path} was made with other settings (checkpoint, seed, number or sampler "
                              "options); starting afresh", file=sys.stderr)
            except (OSError, ValueError, KeyError):
                print(f"{path} is unreadable; starting afresh", file=sys.stderr)

    @property
    def done(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def frames_done(self) -> int:
        return 0 if self.frames is None else self.frames.shape[1]

    @property
    def x0(self) -> np.ndarray:
        return np.concatenate(self.parts)

    def keep(self, end: int, x0) -> None:
        """generate's on_batch: samples end - len(x0) .. end - 1 are done."""
        new = end - self.done
        if new > 0:  # a batch redrawn for its GIF frames is already kept
            self.parts.append(np.asarray(x0, np.float32)[len(x0) - new:])
            self._write()

    def keep_frames(self, frames) -> None:
        """frames (K, F, H, W, C) uint8 of the samples after those already kept."""
        self.frames = frames if self.frames is None else np.concatenate([self.frames, frames], axis=1)
        self._write()

    def _write(self) -> None:
        if self.path:
            arrays = {"x0": self.x0, "settings": self.settings}
            if self.frames is not None:
                arrays["frames"] = self.frames
            save_npz(self.path, **arrays)

    def remove(self) -> None:
        if self.path and os.path.exists(self.path):
            os.remove(self.path)
