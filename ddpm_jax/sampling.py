"""The reverse process, every step inside one `lax.fori_loop`: Algorithm 2 of Ho et al.,
its respaced form, DDIM and DPM-Solver++(2M).

ddpm (Algorithm 2):   x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z,
    z ~ N(0, I), sigma_t^2 = beta_t (the article's choice) or beta-tilde_t, no noise at t = 0.
ddim (Song et al. 2021, eq. 12):
    x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps + sigma_t z,
    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), sigma_t = eta sqrt(beta-tilde_t).
dpmpp_2m (Lu et al. 2022, DPM-Solver++(2M), Algorithm 2): with a_t = sqrt(alpha_bar_t),
    s_t = sqrt(1 - alpha_bar_t), lambda_t = log(a_t / s_t) and h = lambda_{t-1} - lambda_t,
    x_{t-1} = (s_{t-1} / s_t) x_t + a_{t-1} (1 - e^{-h}) D, where D = x0_hat on the first and the
    last step (first order: DDIM) and D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev otherwise,
    r = h_prev / h. The last step goes to alpha_bar = 1 (lambda = inf): it returns x0_hat.
With steps S < T every sampler runs on the chain that visits S timesteps (spread by
`spacing`, see schedule.spaced_timesteps; schedule.respace), one network evaluation per
step. With clip_x0 the x0 estimate is clipped to [-1, 1] and the step goes through it.

`eps_fn(params, x, t[, y]) -> output` is any network (x: (B, H, W, C), t: (B,) int,
y: (B,) int labels, -1 = 'no label', passed only when sampling with labels); its output is
read as `prediction` ('eps' or 'v', see objectives.py). For a flax model it is `model.apply`
with params = {'params': ...}. It is a static argument; params, keys, labels, eta and the
guidance weight are traced: new weights, keys or weights w never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.batching import batched
from ddpm_jax.errors import UserError
from ddpm_jax.objectives import PREDICTIONS, to_eps
from ddpm_jax.schedule import (SPACINGS, Schedule, posterior_mean, predict_x0, respace, reverse_mean,
                               spaced_timesteps)

SIGMAS = ("beta", "beta_tilde")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")

EpsFn = Callable[[object, jnp.ndarray, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How to sample: the one place these settings are defined and checked.

    sampler: 'ddpm' | 'ddim' | 'dpmpp_2m'; steps: network evaluations per sample (0 = all T);
    sigma: ddpm's variance, 'beta' | 'beta_tilde'; eta: ddim's noise in [0, 1];
    clip_x0: clip the x0 estimate to [-1, 1]; guidance: classifier-free weight w >= 0;
    spacing: how fewer than T steps are spread, 'linear' | 'quadratic' | 'logsnr'.
    """

    sampler: str = "ddpm"
    steps: int = 0
    sigma: str = "beta"
    eta: float = 0.0
    clip_x0: bool = False
    guidance: float = 0.0
    spacing: str = "linear"

    @classmethod
    def from_config(cls, sample_config, **overrides) -> "SampleOptions":
        """The options in a config's `sample` section, with the overrides that are not None."""
        values = {f.name: sample_config.get(f.name, f.default) for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self, n_steps: int) -> "SampleOptions":
        """Raises UserError naming the first bad option (a flag of sample.py / evaluate.py,
        or --config.sample.<name>); returns self."""
        def bad(name, wanted):
            return UserError(f"sample option {name} (--{name} or --config.sample.{name}) must be {wanted}, "
                             f"got {getattr(self, name)!r}")

        if self.sampler not in SAMPLERS:
            raise bad("sampler", f"one of {', '.join(SAMPLERS)}")
        if self.sigma not in SIGMAS:
            raise bad("sigma", f"one of {', '.join(SIGMAS)}")
        if self.spacing not in SPACINGS:
            raise bad("spacing", f"one of {', '.join(SPACINGS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
                or not 0 <= self.steps <= n_steps:
            raise bad("steps", f"an integer from 0 (all) to the model's {n_steps} steps")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise bad("eta", "in [0, 1]")
        if not float(self.guidance) >= 0.0:
            raise bad("guidance", ">= 0")
        return self


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


def guided_output(eps_fn: EpsFn, params, x: jnp.ndarray, t: jnp.ndarray, labels, guidance, *,
                  guided: bool) -> jnp.ndarray:
    """The network's output, with labels (B,) if given. guided: classifier-free guidance
    (Ho & Salimans 2022), (1 + w) f(x, t, y) - w f(x, t), both halves in one pass on the
    doubled batch (label -1 = 'no label'); w (`guidance`) is traced."""
    if labels is None:
        return eps_fn(params, x, t)
    if not guided:
        return eps_fn(params, x, t, labels)
    both = eps_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                  jnp.concatenate([labels, jnp.full_like(labels, -1)]))
    conditional, unconditional = jnp.split(both, 2)
    return (1.0 + guidance) * conditional - guidance * unconditional


def _lambda(alpha_bar):
    """log-SNR / 2 = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)); +inf at alpha_bar = 1."""
    return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))


def reverse_step(eps_fn: EpsFn, params, schedule: Schedule, timesteps: jnp.ndarray, x: jnp.ndarray, i,
                 step_keys: jax.Array, x0_prev=None, *, sampler: str = "ddpm", sigma: str = "beta", eta=0.0,
                 clip_x0: bool = False, labels=None, guidance=0.0, guided: bool = False,
                 prediction: str = "eps") -> tuple[jnp.ndarray, jnp.ndarray]:
    """One reverse step from chain index i to i-1 (x_t to x_{t-1} when not respaced).

    schedule: the chain's schedule (respaced or not), index i is model timestep
    timesteps[i]; x: (B, H, W, C); i: scalar int; step_keys: (B,) keys, one per
    sample; the step's noise is normal(fold_in(key, timesteps[i])). x0_prev:
    dpmpp_2m's x0 estimate of the step before (ignored on its first step, i = S-1).
    Returns (x at i-1, this step's x0 estimate).
    """
    t = timesteps[i]
    i_batch = jnp.full((x.shape[0],), i, dtype=jnp.int32)
    output = guided_output(eps_fn, params, x, jnp.full((x.shape[0],), t, dtype=jnp.int32), labels, guidance,
                           guided=guided)
    eps = to_eps(schedule, x, i_batch, output, prediction)
    x0_hat = predict_x0(schedule, x, i_batch, eps)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        eps = (x - schedule.sqrt_alpha_bars[i] * x0_hat) / schedule.sqrt_one_minus_alpha_bars[i]
    if sampler == "dpmpp_2m":
        ab, ab_prev = schedule.alpha_bars[i], schedule.alpha_bars_prev[i]
        lam, lam_prev = _lambda(ab), _lambda(ab_prev)
        h = lam_prev - lam
        # The step before went from chain index i+1 to i: h_prev = lam - lambda(alpha_bar[i+1]).
        h_last = lam - _lambda(schedule.alpha_bars[jnp.minimum(i + 1, schedule.n_steps - 1)])
        second_order = (i < schedule.n_steps - 1) & (i > 0)
        half_inv_r = jnp.where(second_order, 0.5 * h / jnp.where(second_order, h_last, 1.0), 0.0)
        d = x0_hat if x0_prev is None else (1.0 + half_inv_r) * x0_hat - half_inv_r * x0_prev
        # s_{i-1} / s_i and a_{i-1} (1 - e^{-h}), with e^{-h} = 0 on the last step (alpha_bar_prev = 1).
        ratio = jnp.sqrt((1.0 - ab_prev) / (1.0 - ab))
        return ratio * x + (jnp.sqrt(ab_prev) - ratio * jnp.sqrt(ab)) * d, x0_hat
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x.shape[1:], x.dtype))(step_keys)
    if sampler == "ddpm":
        mean = posterior_mean(schedule, x0_hat, x, i_batch) if clip_x0 else reverse_mean(schedule, x, i_batch, eps)
        return mean + reverse_stddevs(schedule, sigma)[i] * z, x0_hat
    if sampler == "ddim":
        ab_prev = schedule.alpha_bars_prev[i]
        std = eta * jnp.sqrt(schedule.posterior_variance[i])  # 0 at the last step
        direction = jnp.sqrt(jnp.maximum(1.0 - ab_prev - std * std, 0.0))
        return jnp.sqrt(ab_prev) * x0_hat + direction * eps + std * z, x0_hat
    raise UserError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")


def sample_keys(key: jax.Array, start: int, count: int) -> jax.Array:
    """Keys of samples start .. start + count - 1 of a run: sample i always uses fold_in(key, i),
    so a sample does not depend on how the run is split into batches."""
    return sample_keys_at(key, jnp.arange(start, start + count))


def sample_keys_at(key: jax.Array, indices) -> jax.Array:
    """fold_in(key, i) for each sample index i in `indices` (B,)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(indices))


def initial_noise_and_step_keys(keys: jax.Array, image_shape: tuple[int, ...]) -> tuple[jnp.ndarray, jax.Array]:
    """x_T ~ N(0, I) for each sample's key, shape (B, *image_shape), and the per-sample keys
    whose fold_in(., t) draws the noise of step t."""
    noise_keys, step_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    x = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(noise_keys)
    return x, step_keys


def chain(schedule: Schedule, steps: int = 0, spacing: str = "linear") -> tuple[Schedule, jnp.ndarray]:
    """(schedule, timesteps) of the chain that `steps` reverse steps walk: the schedule itself
    and 0 .. T-1 for steps = 0 or T (works under jit), else its respaced form."""
    if steps in (0, schedule.n_steps):
        return schedule, jnp.arange(schedule.n_steps, dtype=jnp.int32)
    timesteps = spaced_timesteps(schedule, steps, spacing)
    return respace(schedule, timesteps), jnp.asarray(timesteps)


def sample(eps_fn: EpsFn, params, schedule: Schedule, keys: jax.Array, image_shape: tuple[int, int, int],
           options: SampleOptions | None = None, *, labels=None, num_frames: int = 0, frames_for: int | None = None,
           prediction: str = "eps", **option_overrides) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draws one sample per key (keys: (B,), e.g. from `sample_keys`) of shape image_shape = (H, W, C).

    options: a SampleOptions, or its fields as keywords (sampler='ddim', steps=50, ...);
    labels: (B,) int for conditional models; prediction: what eps_fn outputs ('eps' or 'v').
    Returns (x0, frames): x0 (B, H, W, C) float32, not clipped; frames
    (num_frames, min(B, frames_for), H, W, C), the trajectory of the first `frames_for`
    samples (default all) after the iterations `frame_steps` names (the last frame is x0),
    empty when num_frames = 0.
    """
    options = dataclasses.replace(options or SampleOptions(), **option_overrides).validate(schedule.n_steps)
    if prediction not in PREDICTIONS:
        raise UserError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")
    chain_schedule, timesteps = chain(schedule, options.steps, options.spacing)
    guided = labels is not None and float(options.guidance) != 0.0
    recorded = keys.shape[0] if frames_for is None else max(1, min(keys.shape[0], frames_for))
    return _reverse_process(eps_fn, params, chain_schedule, timesteps, keys, image_shape, labels,
                            jnp.float32(options.eta), jnp.float32(options.guidance), sampler=options.sampler,
                            sigma=options.sigma, clip_x0=options.clip_x0, guided=guided, prediction=prediction,
                            num_frames=num_frames, frames_for=recorded)


@functools.partial(jax.jit, static_argnames=("eps_fn", "image_shape", "sampler", "sigma", "clip_x0", "guided",
                                             "prediction", "num_frames", "frames_for"))
def _reverse_process(eps_fn, params, schedule, timesteps, keys, image_shape, labels, eta, guidance, *, sampler,
                     sigma, clip_x0, guided, prediction, num_frames, frames_for):
    n_steps = schedule.n_steps
    x, step_keys = initial_noise_and_step_keys(keys, image_shape)
    # Iteration i writes its frame into slot slots[i]; iterations that record
    # nothing write into one spare slot at the end, dropped afterwards. This keeps
    # the loop branch-free and the buffer preallocated, for the recorded samples only.
    slots = np.full((n_steps,), num_frames, dtype=np.int32)
    slots[frame_steps(n_steps, num_frames)] = np.arange(num_frames)
    slots = jnp.asarray(slots)
    frames = jnp.zeros((num_frames + 1, frames_for, *x.shape[1:]), jnp.float32) if num_frames else None
    x0_prev = jnp.zeros_like(x) if sampler == "dpmpp_2m" else None  # dpmpp_2m's history

    def body(i, carry):
        x, x0_prev, frames = carry
        x, x0_hat = reverse_step(eps_fn, params, schedule, timesteps, x, n_steps - 1 - i, step_keys, x0_prev,
                                 sampler=sampler, sigma=sigma, eta=eta, clip_x0=clip_x0, labels=labels,
                                 guidance=guidance, guided=guided, prediction=prediction)
        if frames is not None:
            frames = jax.lax.dynamic_update_index_in_dim(frames, x[:frames_for], slots[i], 0)
        return x, (x0_hat if x0_prev is not None else None), frames

    x, _, frames = jax.lax.fori_loop(0, n_steps, body, (x, x0_prev, frames))
    if frames is None:
        frames = jnp.zeros((0, frames_for, *x.shape[1:]), jnp.float32)
    return x, frames[:num_frames]


def sample_batched(eps_fn: EpsFn, params, schedule: Schedule, key: jax.Array, num: int,
                   image_shape: tuple[int, int, int], options: SampleOptions | None = None, *, batch_size: int,
                   labels=None, num_frames: int = 0, frames_for: int = 100, progress: bool = False,
                   batch_sharding=None, prediction: str = "eps", start: int = 0, on_batch=None,
                   **option_overrides) -> tuple[np.ndarray, np.ndarray]:
    """Samples start .. num - 1, drawn `batch_size` at a time (to bound memory); sample i uses
    fold_in(key, i), so the result depends neither on batch_size nor on `start` (a run
    resumed from `start` continues one that stopped there). labels: None or (num,) int,
    sample i's class; options as for `sample`.

    Returns numpy (x0, frames): x0 (num - start, H, W, C) float32; frames (num_frames, F, H, W, C),
    the trajectory of samples start .. min(num, frames_for) - 1 (F of them; recorded only in
    the batches that hold them, and only for those samples). Every batch has the same shape
    (the last is padded), so the sampler compiles at most twice. on_batch(end, x0) sees each
    batch's samples as they are done (batching.batched), e.g. to keep them for a resume. `batch_sharding` (see parallel.py) spreads each
    batch over the devices; the batch is then rounded up to a multiple of their number.
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
    recorded = min(batch_size, frames_for)
    trajectories = []  # only the batches that hold samples below frames_for record frames

    def draw(indices):
        keys = sample_keys_at(key, indices)
        batch_labels = None if labels is None else labels[indices]
        if batch_sharding is not None:
            keys, batch_labels = jax.device_put((keys, batch_labels), batch_sharding)
        first = int(indices[0])
        record = num_frames if first < frames_for else 0
        x0, frames = sample(eps_fn, params, schedule, keys, image_shape, options, labels=batch_labels,
                            num_frames=record, frames_for=recorded, prediction=prediction, **option_overrides)
        if record:
            trajectories.append(np.asarray(frames[:, :min(num, frames_for) - first]))
        return x0

    with tqdm(total=num - start, unit="img", desc="Sampling", disable=not progress, leave=False) as bar:
        def done(end, x0):
            bar.update(len(x0))
            if on_batch is not None:
                on_batch(end, x0)

        x0 = batched(draw, num, batch_size, start=start, on_batch=done)
    frames = (np.concatenate(trajectories, axis=1) if trajectories
              else np.zeros((0, 0, *image_shape), np.float32))
    return x0, frames
