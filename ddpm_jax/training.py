"""Algorithm 1 of Ho et al.: the train state, the loss, a jitted step and a scanned chunk of steps.

RNG discipline (as in VDM): a step's randomness (t, noise, dropout, label dropout,
flips: `loss_keys`) is `fold_in(train_key, step)`, an
epoch's data order is `permutation(fold_in(data_key, epoch))`. Both depend only
on the seed and the step/epoch number, so results do not depend on how steps
are grouped into host calls, and a resumed run replays exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from ddpm_jax.data import to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.objectives import check_objective, loss_weights, target
from ddpm_jax.schedule import Schedule, q_sample


class TrainState(train_state.TrainState):
    """params, opt_state and step (from flax), plus the diffusion schedule the loss needs,
    the EMA of the parameters, and the (static) settings of the loss, the EMA and the
    data augmentation (prediction, loss_weighting, snr_gamma: see objectives.py; random_flip).

    The schedule is a pytree of constants: traced, never trained, never checkpointed.
    ema_params is None when ema_decay = 0.
    """

    schedule: Schedule
    ema_params: Any = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)
    num_classes: int = flax.struct.field(pytree_node=False, default=0)  # > 0: the model takes labels
    label_dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    prediction: str = flax.struct.field(pytree_node=False, default="eps")
    loss_weighting: str = flax.struct.field(pytree_node=False, default="none")
    snr_gamma: float = flax.struct.field(pytree_node=False, default=5.0)
    random_flip: bool = flax.struct.field(pytree_node=False, default=False)  # flip each image with p = 1/2


def run_keys(root_key: jax.Array) -> dict[str, jax.Array]:
    """The independent streams of a run, from its root key `jax.random.key(seed)`:
    parameter init, per-step noise, data order, and pictures made during training."""
    init_key, train_key, data_key, sample_key = jax.random.split(root_key, 4)
    return {"init": init_key, "train": train_key, "data": data_key, "sample": sample_key}


DECAYS = ("constant", "cosine")


def learning_rate(optim_config, total_steps: int = 0):
    """The learning rate: a float when it is constant (the article's Adam 1e-3), else an optax
    schedule of the step: linear warm-up from 0 over optim.warmup_steps, then constant or a
    cosine decay to optim.end_lr_factor x the peak at optim.decay_steps (0 = total_steps)."""
    lr, warmup = optim_config.learning_rate, optim_config.get("warmup_steps", 0)
    decay = optim_config.get("decay", "constant")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"--config.optim.learning_rate must be > 0, got {lr!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"--config.optim.warmup_steps must be an integer >= 0, got {warmup!r}")
    if decay not in DECAYS:
        raise UserError(f"--config.optim.decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    if decay == "constant":
        return float(lr) if warmup == 0 else optax.linear_schedule(0.0, lr, warmup)
    decay_steps = optim_config.get("decay_steps", 0) or total_steps
    if decay_steps <= warmup:
        raise UserError(f"--config.optim.decay_steps ({decay_steps}; 0 = the run's steps) must exceed "
                        f"--config.optim.warmup_steps ({warmup})")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps,
                                              end_value=lr * optim_config.get("end_lr_factor", 0.0))


def learning_rate_at(lr, step) -> float:
    """The learning rate `learning_rate()` gives at `step`."""
    return float(lr(step)) if callable(lr) else lr


def create_optimizer(optim_config, total_steps: int = 0) -> optax.GradientTransformation:
    """Adam with `learning_rate(optim_config, total_steps)`, after clipping the gradient's
    global norm to optim.grad_clip_norm (0 = no clipping)."""
    if optim_config.name != "adam":
        raise UserError(f"unknown optim.name {optim_config.name!r}: use 'adam'")
    clip = optim_config.get("grad_clip_norm", 0.0)
    if not clip >= 0:
        raise UserError(f"--config.optim.grad_clip_norm must be >= 0 (0 = off), got {clip!r}")
    # torch.optim.Adam's defaults are optax's: b1=0.9, b2=0.999, eps=1e-8.
    adam = optax.adam(learning_rate(optim_config, total_steps))
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip else adam


def create_train_state(model: nn.Module, schedule: Schedule, tx: optax.GradientTransformation,
                       key: jax.Array, image_shape: tuple[int, int, int], *, ema_decay: float = 0.0,
                       num_classes: int = 0, label_dropout: float = 0.0, prediction: str = "eps",
                       loss_weighting: str = "none", snr_gamma: float = 5.0,
                       random_flip: bool = False) -> TrainState:
    """Initialises the model's parameters for images of shape (H, W, C) and the optimizer state;
    the EMA starts at the initial parameters. random_flip: every step flips each of its
    images left-right with probability 1/2 (see `random_flip`)."""
    check_objective(prediction, loss_weighting, snr_gamma)
    if not 0.0 <= ema_decay < 1.0:
        raise UserError(f"--config.train.ema_decay must lie in [0, 1), got {ema_decay}")
    if not 0.0 <= label_dropout <= 1.0:
        raise UserError(f"--config.train.label_dropout must lie in [0, 1], got {label_dropout}")
    labels = jnp.zeros((1,), jnp.int32) if num_classes else None
    # One compiled program rather than hundreds of op-by-op ones: train.py peaks ~180 MiB lower.
    variables = jax.jit(model.init)(key, jnp.zeros((1, *image_shape), jnp.float32), jnp.zeros((1,), jnp.int32), labels)
    params = variables["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, schedule=schedule,
                             ema_params=jax.tree.map(jnp.copy, params) if ema_decay else None,
                             ema_decay=ema_decay, num_classes=num_classes, label_dropout=label_dropout,
                             prediction=prediction, loss_weighting=loss_weighting, snr_gamma=snr_gamma,
                             random_flip=bool(random_flip))


def ema_decay_at(ema_decay: float, step) -> jnp.ndarray:
    """The EMA's decay after `step` updates, warmed up: min(ema_decay, (1 + step) / (10 + step)),
    so the average does not stay anchored at the random initialisation."""
    return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def loss_keys(key: jax.Array) -> dict[str, jax.Array]:
    """A step's independent streams: t, the noise, dropout, label dropout and the flips. t and
    noise are split(key), as they always were (the article model's draws stay bit-identical);
    the others are fold_in(key, 2 | 3 | 4), which no split of `key` yields (split(key)[i] is
    fold_in(key, i) for i = 0, 1)."""
    t_key, noise_key = jax.random.split(key)
    return {"t": t_key, "noise": noise_key, "dropout": jax.random.fold_in(key, 2),
            "label": jax.random.fold_in(key, 3), "flip": jax.random.fold_in(key, 4)}


def random_flip(x: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """Each image of the batch x (B, H, W, C) mirrored left-right with probability 1/2,
    independently, drawn from `key`: (B, H, W, C)."""
    flipped = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flipped[:, None, None, None], x[:, :, ::-1, :], x)


def diffusion_loss(params, apply_fn, schedule: Schedule, x0: jnp.ndarray, key: jax.Array, labels=None, *,
                   num_classes: int = 0, label_dropout: float = 0.0, prediction: str = "eps",
                   loss_weighting: str = "none", snr_gamma: float = 5.0) -> jnp.ndarray:
    """Algorithm 1's loss at a uniform t: the MSE between the network's output and its target
    (the noise for prediction='eps', L_simple; v for 'v'), each example weighted by
    objectives.loss_weights (1 for 'none').

    x0: (B, H, W, C); labels: (B,) int or None. For a conditional model a share
    `label_dropout` of the labels becomes num_classes ('no label'), which teaches
    it the unconditional prediction that guidance needs.
    """
    keys = loss_keys(key)
    t = jax.random.randint(keys["t"], (x0.shape[0],), 0, schedule.n_steps)
    noise = jax.random.normal(keys["noise"], x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    if labels is not None:
        dropped = jax.random.bernoulli(keys["label"], label_dropout, labels.shape)
        labels = jnp.where(dropped, num_classes, labels)
    output = apply_fn({"params": params}, x_t, t, labels, train=True, rngs={"dropout": keys["dropout"]})
    squared_error = (output - target(schedule, x0, t, noise, prediction)) ** 2
    if loss_weighting == "none":
        return jnp.mean(squared_error)
    weights = loss_weights(schedule, t, prediction, loss_weighting, snr_gamma)
    return jnp.mean(weights * jnp.mean(squared_error, axis=tuple(range(1, x0.ndim))))


def _train_step(state: TrainState, x0: jnp.ndarray, key: jax.Array, labels=None) -> tuple[TrainState, dict]:
    """One step; returns the new state and {'loss', 'grad_norm'} (the gradient's global norm, before clipping)."""
    step_key = jax.random.fold_in(key, state.step)
    if state.random_flip:  # static: without flips the program is the one it always was
        x0 = random_flip(x0, loss_keys(step_key)["flip"])
    loss, grads = jax.value_and_grad(diffusion_loss)(state.params, state.apply_fn, state.schedule, x0, step_key,
                                                     labels, num_classes=state.num_classes,
                                                     label_dropout=state.label_dropout, prediction=state.prediction,
                                                     loss_weighting=state.loss_weighting, snr_gamma=state.snr_gamma)
    state = state.apply_gradients(grads=grads)
    if state.ema_params is not None:
        decay = ema_decay_at(state.ema_decay, state.step)
        state = state.replace(ema_params=update_ema(state.ema_params, state.params, decay))
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@jax.jit
def train_step(state: TrainState, x0: jnp.ndarray, key: jax.Array, labels=None) -> tuple[TrainState, jnp.ndarray]:
    """One step of Algorithm 1 on a batch x0 (B, H, W, C) in [-1, 1] (labels (B,) for a conditional
    model); `key` is the run's train key."""
    if (labels is None) != (state.num_classes == 0):
        raise UserError("a conditional model (num_classes > 0) trains on labels, an unconditional one without")
    state, metrics = _train_step(state, x0, key, labels)
    return state, metrics["loss"]


@functools.partial(jax.jit, static_argnames=("num_buckets",))
def loss_per_t(state: TrainState, x0: jnp.ndarray, key: jax.Array, *, num_buckets: int = 10) -> jnp.ndarray:
    """The unweighted MSE of the network's prediction, with the EMA weights if kept, on the
    batch x0 (B, H, W, C) at a t drawn uniformly within each of `num_buckets` equal parts
    of [0, T): (num_buckets,). Which timesteps are hard (and where min-SNR weighting acts)."""
    params = state.ema_params if state.ema_params is not None else state.params
    labels = jnp.full((x0.shape[0],), state.num_classes, jnp.int32) if state.num_classes else None
    edges = jnp.linspace(0, state.schedule.n_steps, num_buckets + 1).astype(jnp.int32)

    def bucket(b):
        t_key, noise_key = jax.random.split(jax.random.fold_in(key, b))
        t = jax.random.randint(t_key, (x0.shape[0],), edges[b], edges[b + 1])
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        output = state.apply_fn({"params": params}, q_sample(state.schedule, x0, t, noise), t, labels)
        return jnp.mean((output - target(state.schedule, x0, t, noise, state.prediction)) ** 2)

    return jax.lax.map(bucket, jnp.arange(num_buckets))


def epoch_permutation(data_key: jax.Array, epoch: int | jnp.ndarray, num_examples: int) -> jnp.ndarray:
    """The order in which epoch `epoch` visits the training set: (num_examples,) int32."""
    return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


def _batch(images: jnp.ndarray, labels, order: jnp.ndarray, index, batch_size: int, sharding):
    """Batch `index` of the epoch's order: images as float32 in [-1, 1], (batch_size, H, W, C),
    and their labels (batch_size,) or None, split over the devices by `sharding`
    (None: wherever XLA puts it)."""
    indices = jax.lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
    batch = (to_model_range(images[indices]), None if labels is None else labels[indices])
    return batch if sharding is None else jax.lax.with_sharding_constraint(batch, sharding)


def _step_on_batch(state, images, labels, order, batch_index, key, batch_size, batch_sharding):
    x0, batch_labels = _batch(images, labels, order, batch_index, batch_size, batch_sharding)
    return _train_step(state, x0, key, batch_labels)


_train_batch = jax.jit(_step_on_batch, static_argnames=("batch_size", "batch_sharding"), donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("num_steps", "batch_size", "batch_sharding"), donate_argnums=(0,))
def _train_scan(state, images, labels, order, first_batch, key, *, num_steps, batch_size, batch_sharding):
    def body(state, batch_index):
        return _step_on_batch(state, images, labels, order, batch_index, key, batch_size, batch_sharding)

    return jax.lax.scan(body, state, first_batch + jnp.arange(num_steps))


def scan_by_default() -> bool:
    """Whether train_chunk scans by default: on accelerators, yes. XLA:CPU runs the
    convolutions of a backward pass several times slower inside a loop body
    (jax-ml/jax#12868; 7x for this U-Net), so on CPU the chunk is a host loop of
    jitted steps, dispatched asynchronously."""
    return jax.default_backend() != "cpu"


def _scans(scan: bool | None) -> bool:
    return scan if scan is not None else scan_by_default()


def compile_train_chunk(state: TrainState, images: jnp.ndarray, order: jnp.ndarray, key: jax.Array, *,
                        num_steps: int, batch_size: int, labels=None, scan: bool | None = None,
                        batch_sharding=None) -> None:
    """Compiles, without running, the program that `train_chunk` with these arguments runs
    (its call then finds it compiled), so that the compiler's memory can be released
    (runtime.release_free_host_memory) before the first step allocates its own."""
    static = dict(batch_size=batch_size, batch_sharding=batch_sharding)
    if _scans(scan):
        _train_scan.lower(state, images, labels, order, 0, key, num_steps=num_steps, **static).compile()
    else:
        _train_batch.lower(state, images, labels, order, 0, key, **static).compile()


def train_chunk(state: TrainState, images: jnp.ndarray, order: jnp.ndarray, first_batch, key: jax.Array, *,
                num_steps: int, batch_size: int, labels=None, scan: bool | None = None,
                batch_sharding=None) -> tuple[TrainState, dict]:
    """`num_steps` consecutive steps with the data already on the device(s).

    images: (N, H, W, C) uint8, the whole training set; labels: (N,) int32, for
    a conditional model (else None); order: (N,) the epoch's permutation; the
    chunk trains on batches first_batch .. first_batch + num_steps - 1 of that
    order. (Or images and labels hold just the chunk's batches, gathered on the
    host in that order, with order = arange and first_batch = 0: the same batches.)
    With scan=True (default on accelerators) the chunk is one compiled `lax.scan`;
    otherwise a loop of jitted steps; the two agree to float rounding. `batch_sharding` (see parallel.py) splits each batch over devices,
    with state, images and order replicated. Returns the new state (the input
    state's buffers are donated) and the metrics {'loss', 'grad_norm'}, each (num_steps,).
    """
    if (labels is None) != (state.num_classes == 0):
        raise UserError("a conditional model (num_classes > 0) trains on labels, an unconditional one without")
    static = dict(batch_size=batch_size, batch_sharding=batch_sharding)
    if _scans(scan):
        return _train_scan(state, images, labels, order, first_batch, key, num_steps=num_steps, **static)
    metrics = []
    for i in range(num_steps):
        state, step_metrics = _train_batch(state, images, labels, order, first_batch + i, key, **static)
        # Waiting costs nothing next to a CPU step, and keeps the next step's temporaries
        # (~380 MB at batch 128) from being allocated before this step's are freed.
        metrics.append(jax.block_until_ready(step_metrics))
    return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)
