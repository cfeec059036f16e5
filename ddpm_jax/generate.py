"""A trained model, loaded from a checkpoint, and samples drawn from it: what sample.py,
evaluate.py and notebooks share.

    trained = load_trained("runs/fashion")            # EMA weights when the run kept them
    x0, frames = generate(trained, num=64, sampler="ddim", steps=50)

Every sampling option left at None takes the checkpoint config's `config.sample` value.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ddpm_jax.checkpoint import load_checkpoint
from ddpm_jax.errors import UserError
from ddpm_jax.models import create_model
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


def sample_options(config, **overrides) -> dict:
    """`sample`'s options: the config's `config.sample` values, with the overrides that are not None."""
    s = config.sample
    options = dict(sampler=s.sampler, steps=s.steps, sigma=s.sigma, eta=s.eta, clip_x0=s.clip_x0,
                   guidance=s.guidance)
    options.update({k: v for k, v in overrides.items() if v is not None})
    return options


def generate(trained: Trained, *, num: int, seed: int = 0, labels=None, batch_size: int = 256,
             num_frames: int = 0, frames_for: int = 100, progress: bool = True, mesh=None,
             **overrides) -> tuple[np.ndarray, np.ndarray]:
    """`num` samples (and the trajectory of the first `frames_for`), as sampling.sample_batched returns
    them: x0 float32 (num, H, W, C), not clipped. Sample i uses fold_in(key(seed), i).

    labels: None, or (num,) ints for a conditional model (None there means 'no label').
    overrides: sampler, steps, sigma, eta, clip_x0, guidance (None = the config's).
    mesh: a device mesh (parallel.make_mesh) whose devices share each batch.
    """
    from ddpm_jax.parallel import batch_sharding, replicated
    from ddpm_jax.sampling import sample_batched

    options = sample_options(trained.config, **overrides)
    if labels is not None and not trained.num_classes:
        raise UserError("this model is unconditional: it takes no labels (train one with --config.model.num_classes)")
    if labels is None:
        options["guidance"] = 0.0  # guidance needs a class to guide towards
    elif np.any((np.asarray(labels) < 0) | (np.asarray(labels) >= trained.num_classes)):
        raise UserError(f"labels must lie in 0 .. {trained.num_classes - 1}")
    params, split = trained.params, None
    if mesh is not None and mesh.size > 1:
        params, split = jax.device_put(params, replicated(mesh)), batch_sharding(mesh)
    return sample_batched(trained.eps_fn, params, trained.schedule, jax.random.key(seed), num, trained.image_shape,
                          batch_size=batch_size, labels=labels, num_frames=num_frames, frames_for=frames_for,
                          progress=progress, batch_sharding=split, **options)
