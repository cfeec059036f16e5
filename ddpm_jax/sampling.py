"""The reverse process, every step inside one `lax.fori_loop`: Algorithm 2 of Ho et al.,
its respaced form, and DDIM.

ddpm (Algorithm 2):   x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z,
    z ~ N(0, I), sigma_t^2 = beta_t (the article's choice) or beta-tilde_t, no noise at t = 0.
ddim (Song et al. 2021, eq. 12):
    x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps + sigma_t z,
    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), sigma_t = eta sqrt(beta-tilde_t).
With steps S < T both run on the respaced chain that visits S evenly spread
timesteps (schedule.respace); with clip_x0 the x0 estimate is clipped to [-1, 1]
and the step goes through it (ddpm: the posterior mean of q(x_{t-1} | x_t, x0_hat)).

`eps_fn(params, x, t[, y]) -> eps` is any noise predictor (x: (B, H, W, C), t: (B,) int,
y: (B,) int labels, passed only when sampling with labels); for a flax model it
is `model.apply` with params = {'params': ...}. It is a static argument; params,
keys and labels are traced: new weights or keys never recompile.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError
from ddpm_jax.schedule import (Schedule, posterior_mean, predict_x0, respace, respaced_timesteps,
                               reverse_mean)

SIGMAS = ("beta", "beta_tilde")
SAMPLERS = ("ddpm", "ddim")

EpsFn = Callable[[object, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def reverse_stddevs(schedule: Schedule, sigma: str) -> jnp.ndarray:
    """sigma_t for t = 0 .. T-1, with sigma_0 = 0 (the last step adds no noise)."""
    if sigma == "beta":
        variances = schedule.betas
    elif sigma == "beta_tilde":
        variances = schedule.posterior_variance
    else:
        raise UserError(f"unknown sigma {sigma!r}: use 'beta' or 'beta_tilde'")
    return jnp.sqrt(variances).at[0].set(0.0)


def frame_steps(n_steps: int, num_frames: int) -> np.ndarray:
    """Loop iterations (0 = the step from T-1) after which a frame is recorded, as the article
    picks them: floor(linspace(0, T, K)) below T, and the last step, so the last frame is x0.
    Shape (num_frames,), int, strictly increasing (num_frames <= T)."""
    if not 0 <= num_frames <= n_steps:
        raise UserError(f"frames must be between 0 and the number of steps ({n_steps}), got {num_frames}")
    if num_frames == 0:
        return np.zeros((0,), np.int32)
    evenly = np.floor(np.linspace(0, n_steps, num_frames)).astype(np.int32)[:-1]
    return np.append(evenly, n_steps - 1).astype(np.int32)


def guided_eps(eps_fn: EpsFn, params, x: jnp.ndarray, t: jnp.ndarray, labels, guidance: float) -> jnp.ndarray:
    """The noise prediction, with labels (B,) if given; guidance w > 0 mixes in the
    unconditional one (Ho & Salimans 2022): (1 + w) eps(x, t, y) - w eps(x, t)."""
    if labels is None:
        return eps_fn(params, x, t)
    eps = eps_fn(params, x, t, labels)
    if guidance:
        eps = (1.0 + guidance) * eps - guidance * eps_fn(params, x, t)
    return eps


def reverse_step(eps_fn: EpsFn, params, schedule: Schedule, timesteps: jnp.ndarray, x: jnp.ndarray, i,
                 step_keys: jax.Array, *, sampler: str = "ddpm", sigma: str = "beta", eta=0.0,
                 clip_x0: bool = False, labels=None, guidance: float = 0.0) -> jnp.ndarray:
    """One reverse step from chain index i to i-1 (x_t to x_{t-1} when not respaced).

    schedule: the chain's schedule (respaced or not), index i is model timestep
    timesteps[i]; x: (B, H, W, C); i: scalar int; step_keys: (B,) keys, one per
    sample; the step's noise is normal(fold_in(key, timesteps[i])).
    """
    t = timesteps[i]
    i_batch = jnp.full((x.shape[0],), i, dtype=jnp.int32)
    eps = guided_eps(eps_fn, params, x, jnp.full((x.shape[0],), t, dtype=jnp.int32), labels, guidance)
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x.shape[1:], x.dtype))(step_keys)
    if clip_x0 or sampler == "ddim":
        x0_hat = predict_x0(schedule, x, i_batch, eps)
        if clip_x0:
            x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    if sampler == "ddpm":
        mean = posterior_mean(schedule, x0_hat, x, i_batch) if clip_x0 else reverse_mean(schedule, x, i_batch, eps)
        return mean + reverse_stddevs(schedule, sigma)[i] * z
    if sampler == "ddim":
        ab, ab_prev = schedule.alpha_bars[i], schedule.alpha_bars_prev[i]
        if clip_x0:  # the noise direction that goes with the clipped x0
            eps = (x - jnp.sqrt(ab) * x0_hat) / jnp.sqrt(1.0 - ab)
        std = eta * jnp.sqrt(schedule.posterior_variance[i])  # 0 at the last step
        direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - std * std, 0.0))
        return jnp.sqrt(ab_prev) * x0_hat + direction * eps + std * z
    raise UserError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")


def sample_keys(key: jax.Array, start: int, count: int) -> jax.Array:
    """Keys of samples start .. start + count - 1 of a run: sample i always uses fold_in(key, i),
    so a sample does not depend on how the run is split into batches."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(start, start + count))


def initial_noise_and_step_keys(keys: jax.Array, image_shape: tuple[int, ...]) -> tuple[jnp.ndarray, jax.Array]:
    """x_T ~ N(0, I) for each sample's key, shape (B, *image_shape), and the per-sample keys
    whose fold_in(., t) draws the noise of step t."""
    noise_keys, step_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    x = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(noise_keys)
    return x, step_keys


def chain(schedule: Schedule, steps: int = 0) -> tuple[Schedule, jnp.ndarray]:
    """(schedule, timesteps) of the chain that `steps` reverse steps walk: the schedule itself
    and 0 .. T-1 for steps = 0 or T (works under jit), else its respaced form."""
    if steps in (0, schedule.n_steps):
        return schedule, jnp.arange(schedule.n_steps, dtype=jnp.int32)
    timesteps = respaced_timesteps(schedule.n_steps, steps)
    return respace(schedule, timesteps), jnp.asarray(timesteps)


def sample(eps_fn: EpsFn, params, schedule: Schedule, keys: jax.Array, image_shape: tuple[int, int, int], *,
           sampler: str = "ddpm", steps: int = 0, sigma: str = "beta", eta: float = 0.0, clip_x0: bool = False,
           labels=None, guidance: float = 0.0, num_frames: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draws one sample per key (keys: (B,), e.g. from `sample_keys`) of shape image_shape = (H, W, C).

    steps: reverse steps (0 = all T); labels: (B,) int for conditional models.
    Returns (x0, frames): x0 (B, H, W, C) float32, not clipped; frames
    (num_frames, B, H, W, C), the trajectory after the iterations `frame_steps`
    names (the last frame is x0), empty when num_frames = 0.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sigma not in SIGMAS:
        raise UserError(f"unknown sigma {sigma!r}: use one of {', '.join(SIGMAS)}")
    if not 0.0 <= float(eta) <= 1.0 and sampler == "ddim":
        raise UserError(f"eta must lie in [0, 1], got {eta}")
    chain_schedule, timesteps = chain(schedule, steps)
    return _reverse_process(eps_fn, params, chain_schedule, timesteps, keys, image_shape, labels,
                            jnp.float32(eta), sampler=sampler, sigma=sigma, clip_x0=clip_x0,
                            guidance=float(guidance), num_frames=num_frames)


@functools.partial(jax.jit, static_argnames=("eps_fn", "image_shape", "sampler", "sigma", "clip_x0", "guidance",
                                             "num_frames"))
def _reverse_process(eps_fn, params, schedule, timesteps, keys, image_shape, labels, eta, *, sampler, sigma,
                     clip_x0, guidance, num_frames):
    n_steps = schedule.n_steps
    x, step_keys = initial_noise_and_step_keys(keys, image_shape)
    # Iteration i writes its frame into slot slots[i]; iterations that record
    # nothing write into one spare slot at the end, dropped afterwards. This keeps
    # the loop branch-free and the buffer preallocated.
    slots = np.full((n_steps,), num_frames, dtype=np.int32)
    slots[frame_steps(n_steps, num_frames)] = np.arange(num_frames)
    slots = jnp.asarray(slots)
    frames = jnp.zeros((num_frames + 1, *x.shape), jnp.float32) if num_frames else None

    def body(i, carry):
        x, frames = carry
        x = reverse_step(eps_fn, params, schedule, timesteps, x, n_steps - 1 - i, step_keys, sampler=sampler,
                         sigma=sigma, eta=eta, clip_x0=clip_x0, labels=labels, guidance=guidance)
        if frames is not None:
            frames = jax.lax.dynamic_update_index_in_dim(frames, x, slots[i], 0)
        return x, frames

    x, frames = jax.lax.fori_loop(0, n_steps, body, (x, frames))
    if frames is None:
        frames = jnp.zeros((0, *x.shape), jnp.float32)
    return x, frames[:num_frames]


def sample_batched(eps_fn: EpsFn, params, schedule: Schedule, key: jax.Array, num: int,
                   image_shape: tuple[int, int, int], *, batch_size: int, labels=None, num_frames: int = 0,
                   frames_for: int = 100, progress: bool = False, batch_sharding=None,
                   **options) -> tuple[np.ndarray, np.ndarray]:
    """`num` samples drawn `batch_size` at a time (to bound memory); sample i uses fold_in(key, i),
    so the result does not depend on batch_size. labels: None or (num,) int, sample i's class;
    `options` are `sample`'s (sampler, steps, sigma, eta, clip_x0, guidance).

    Returns numpy (x0, frames): x0 (num, H, W, C) float32; frames (num_frames,
    min(num, frames_for), H, W, C), the trajectory of the first `frames_for`
    samples. Every batch has the same shape (the last is padded with extra
    samples, then cut), so the sampler compiles at most twice. `batch_sharding`
    (see parallel.py) spreads each batch over the devices; the batch is then
    rounded up to a multiple of their number.
    """
    if num < 1 or batch_size < 1:
        raise UserError(f"need at least one sample and a batch size >= 1, got num={num}, batch={batch_size}")
    from tqdm.auto import tqdm

    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num,):
            raise UserError(f"need one label per sample: {num} samples, labels of shape {labels.shape}")
    batch_size = min(batch_size, num)
    if batch_sharding is not None:
        devices = batch_sharding.mesh.size
        batch_size = -(-batch_size // devices) * devices
    samples, trajectories = [], []
    with tqdm(total=num, unit="img", desc="Sampling", disable=not progress, leave=False) as bar:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            record = num_frames if start < frames_for else 0
            keys = sample_keys(key, start, batch_size)
            batch_labels = None if labels is None else np.resize(labels[start:], batch_size)  # padded by repeats
            if batch_sharding is not None:
                keys, batch_labels = jax.device_put((keys, batch_labels), batch_sharding)
            x0, frames = sample(eps_fn, params, schedule, keys, image_shape, labels=batch_labels,
                                num_frames=record, **options)
            samples.append(np.asarray(x0[:count]))
            if record:
                trajectories.append(np.asarray(frames[:, :min(count, frames_for - start)]))
            bar.update(count)
    frames = (np.concatenate(trajectories, axis=1) if trajectories
              else np.zeros((0, 0, *image_shape), np.float32))
    return np.concatenate(samples), frames
