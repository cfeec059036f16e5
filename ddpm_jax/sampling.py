"""Algorithm 2 of Ho et al.: the reverse process, all T steps inside one `lax.fori_loop`.

    x_T ~ N(0, I);  for t = T-1 .. 0:
        x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z,
    with z ~ N(0, I), sigma_t^2 = beta_t (the article's choice) or beta-tilde_t, and no noise at t = 0.

`eps_fn(params, x, t) -> eps` is any noise predictor (x: (B, H, W, C), t: (B,) int);
for a flax model it is `model.apply` with params = {'params': ...}. It is a static
argument, params and key are traced: new weights or keys never recompile.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError
from ddpm_jax.schedule import Schedule, reverse_mean

SIGMAS = ("beta", "beta_tilde")

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


def ddpm_step(eps_fn: EpsFn, params, schedule: Schedule, sigmas: jnp.ndarray, x: jnp.ndarray,
              t: jnp.ndarray, step_keys: jax.Array) -> jnp.ndarray:
    """One reverse step from x_t to x_{t-1}. t: scalar int; step_keys: (B,) keys, one per sample."""
    t_batch = jnp.full((x.shape[0],), t, dtype=jnp.int32)
    eps = eps_fn(params, x, t_batch)
    mean = reverse_mean(schedule, x, t_batch, eps)
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x.shape[1:], x.dtype))(step_keys)
    return mean + sigmas[t] * z


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


@functools.partial(jax.jit, static_argnames=("eps_fn", "image_shape", "sigma", "num_frames"))
def sample(eps_fn: EpsFn, params, schedule: Schedule, keys: jax.Array, image_shape: tuple[int, int, int], *,
           sigma: str = "beta", num_frames: int = 0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draws one sample per key (keys: (B,), e.g. from `sample_keys`) of shape image_shape = (H, W, C).

    Returns (x0, frames): x0 (B, H, W, C) float32, not clipped; frames
    (num_frames, B, H, W, C), the trajectory after the iterations `frame_steps`
    names (the last frame is x0), empty when num_frames = 0.
    """
    n_steps = schedule.n_steps
    sigmas = reverse_stddevs(schedule, sigma)
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
        x = ddpm_step(eps_fn, params, schedule, sigmas, x, n_steps - 1 - i, step_keys)
        if frames is not None:
            frames = jax.lax.dynamic_update_index_in_dim(frames, x, slots[i], 0)
        return x, frames

    x, frames = jax.lax.fori_loop(0, n_steps, body, (x, frames))
    if frames is None:
        frames = jnp.zeros((0, *x.shape), jnp.float32)
    return x, frames[:num_frames]


def sample_batched(eps_fn: EpsFn, params, schedule: Schedule, key: jax.Array, num: int,
                   image_shape: tuple[int, int, int], *, batch_size: int, sigma: str = "beta",
                   num_frames: int = 0, frames_for: int = 100, progress: bool = False,
                   batch_sharding=None) -> tuple[np.ndarray, np.ndarray]:
    """`num` samples drawn `batch_size` at a time (to bound memory); sample i uses fold_in(key, i),
    so the result does not depend on batch_size.

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
            if batch_sharding is not None:
                keys = jax.device_put(keys, batch_sharding)
            x0, frames = sample(eps_fn, params, schedule, keys, image_shape, sigma=sigma, num_frames=record)
            samples.append(np.asarray(x0[:count]))
            if record:
                trajectories.append(np.asarray(frames[:, :min(count, frames_for - start)]))
            bar.update(count)
    frames = (np.concatenate(trajectories, axis=1) if trajectories
              else np.zeros((0, 0, *image_shape), np.float32))
    return np.concatenate(samples), frames
