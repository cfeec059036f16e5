"""The noise schedule: a frozen pytree of per-step arrays plus pure functions over it.

Notation follows Ho et al. (2020): beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, with t = 0 .. T-1 (0-based, as in the article's code).
Every array is computed in float64 NumPy and stored as float32, so the
constants are exact to float32 rounding whatever the length of the product.
A schedule only needs to produce betas (`linear_beta_schedule`,
`cosine_beta_schedule`): `schedule_from_betas` derives the rest.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError


@flax.struct.dataclass
class Schedule:
    """Per-step constants, each of shape (T,), float32. Index with an int array t in [0, T)."""

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alpha_bars: jnp.ndarray
    alpha_bars_prev: jnp.ndarray  # alpha_bar_{t-1}, with alpha_bars_prev[0] = 1
    sqrt_alpha_bars: jnp.ndarray
    sqrt_one_minus_alpha_bars: jnp.ndarray
    sqrt_recip_alphas: jnp.ndarray  # 1 / sqrt(alpha_t)
    eps_coefs: jnp.ndarray  # beta_t / sqrt(1 - alpha_bar_t): weight of eps in the reverse mean
    posterior_variance: jnp.ndarray  # beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t; 0 at t = 0
    posterior_mean_coef_x0: jnp.ndarray  # sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
    posterior_mean_coef_xt: jnp.ndarray  # sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)

    @property
    def n_steps(self) -> int:
        return self.betas.shape[0]


def schedule_from_betas(betas) -> Schedule:
    """Derives every constant from betas (shape (T,)), in float64, stored as float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise UserError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise UserError("every beta must lie in (0, 1): check the schedule's beta_min/beta_max")
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    one_minus = 1.0 - alpha_bars
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alpha_bars=alpha_bars,
        alpha_bars_prev=alpha_bars_prev,
        sqrt_alpha_bars=np.sqrt(alpha_bars),
        sqrt_one_minus_alpha_bars=np.sqrt(one_minus),
        sqrt_recip_alphas=1.0 / np.sqrt(alphas),
        eps_coefs=betas / np.sqrt(one_minus),
        # At t = 0, alpha_bars_prev = 1 makes these exactly 0 and beta_0 / beta_0 = 1:
        # the posterior q(x_{-1} | x_0) collapses onto x0.
        posterior_variance=(1.0 - alpha_bars_prev) / one_minus * betas,
        posterior_mean_coef_x0=np.sqrt(alpha_bars_prev) * betas / one_minus,
        posterior_mean_coef_xt=np.sqrt(alphas) * (1.0 - alpha_bars_prev) / one_minus,
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def linear_beta_schedule(n_steps: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02) -> Schedule:
    """Ho et al.'s schedule: betas evenly spaced from beta_min to beta_max (both included)."""
    if n_steps < 1:
        raise UserError(f"n_steps must be >= 1, got {n_steps}")
    if not 0 < beta_min <= beta_max < 1:
        raise UserError(f"need 0 < beta_min <= beta_max < 1, got beta_min={beta_min}, beta_max={beta_max}")
    return schedule_from_betas(np.linspace(beta_min, beta_max, n_steps, dtype=np.float64))


def cosine_beta_schedule(n_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2),
    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t) for t = 0 .. T-1, clipped at max_beta (the last one is)."""
    if n_steps < 1:
        raise UserError(f"n_steps must be >= 1, got {n_steps}")

    def f(t):
        return np.cos((t / n_steps + s) / (1 + s) * np.pi / 2) ** 2

    t = np.arange(n_steps + 1, dtype=np.float64)
    alpha_bar = f(t) / f(0.0)
    return schedule_from_betas(np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta))


def make_schedule(diffusion_config) -> Schedule:
    """The schedule a config's `diffusion` section names ('linear' uses beta_min/beta_max)."""
    name = diffusion_config.schedule
    if name == "linear":
        return linear_beta_schedule(diffusion_config.n_steps, diffusion_config.beta_min, diffusion_config.beta_max)
    if name == "cosine":
        return cosine_beta_schedule(diffusion_config.n_steps)
    raise UserError(f"unknown diffusion.schedule {name!r}: use 'linear' or 'cosine'")


def _at(values: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """values[t] shaped (B, 1, ..., 1) to broadcast against a batch of rank `ndim`."""
    v = values[t]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.  x0, noise: (B, H, W, C); t: (B,) int."""
    return (_at(schedule.sqrt_alpha_bars, t, x0.ndim) * x0
            + _at(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim) * noise)


def predict_x0(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """The x0 that q_sample maps to x_t with this noise: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return ((x_t - _at(schedule.sqrt_one_minus_alpha_bars, t, x_t.ndim) * eps)
            / _at(schedule.sqrt_alpha_bars, t, x_t.ndim))


def posterior_mean(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Mean of q(x_{t-1} | x_t, x0) (Ho et al. eq. 7). At t = 0 it is x0."""
    return (_at(schedule.posterior_mean_coef_x0, t, x0.ndim) * x0
            + _at(schedule.posterior_mean_coef_xt, t, x0.ndim) * x_t)


def reverse_mean(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
    """Mean of p(x_{t-1} | x_t) from predicted noise (Algorithm 2):
    (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t). Equals posterior_mean(predict_x0(...))."""
    return _at(schedule.sqrt_recip_alphas, t, x_t.ndim) * (x_t - _at(schedule.eps_coefs, t, x_t.ndim) * eps)


def respaced_timesteps(n_steps: int, steps: int) -> np.ndarray:
    """`steps` timesteps spread evenly over [0, T-1], both ends included, ascending:
    round(linspace(0, T-1, steps)). steps = T gives 0 .. T-1."""
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n_steps:
        raise UserError(f"steps must be an integer between 1 and the schedule's {n_steps} steps, got {steps!r}")
    if steps == 1:
        return np.array([n_steps - 1], np.int32)
    return np.round(np.linspace(0, n_steps - 1, steps)).astype(np.int32)


SPACINGS = ("linear", "quadratic", "logsnr")


def spaced_timesteps(schedule: Schedule, steps: int, spacing: str = "linear") -> np.ndarray:
    """`steps` distinct timesteps in [0, T-1], ascending, first 0 and last T-1, spread
    'linear' (round(linspace(0, T-1, steps)), as respaced_timesteps), 'quadratic'
    (round((T-1) (k / (steps-1))^2): denser near t = 0, as DDIM's CIFAR-10 setting) or
    'logsnr' (evenly in log-SNR, lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) / 2, as
    DPM-Solver suggests for small images). Needs a concrete schedule (outside jit)."""
    n_steps = schedule.n_steps
    if spacing == "linear":
        return respaced_timesteps(n_steps, steps)
    if spacing not in SPACINGS:
        raise UserError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    respaced_timesteps(n_steps, steps)  # the same bounds check
    if steps == 1:
        return np.array([n_steps - 1], np.int32)
    fractions = np.linspace(0.0, 1.0, steps)
    if spacing == "quadratic":
        t = np.round((n_steps - 1) * fractions**2)
    else:
        alpha_bars = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
        lambdas = 0.5 * (np.log(alpha_bars) - np.log1p(-alpha_bars))  # decreasing in t
        wanted = lambdas[0] + fractions * (lambdas[-1] - lambdas[0])
        t = np.round(np.interp(-wanted, -lambdas, np.arange(n_steps, dtype=np.float64)))
    t = t.astype(np.int64)
    # Rounding can repeat a timestep where the spacing is finer than 1: keep them distinct.
    for k in range(1, steps):
        t[k] = max(t[k], t[k - 1] + 1)
    for k in range(steps - 1, -1, -1):
        t[k] = min(t[k], n_steps - steps + k)
    return t.astype(np.int32)


def respace(schedule: Schedule, timesteps) -> Schedule:
    """The schedule of the Markov chain that visits only `timesteps` (ascending): step i
    goes from timesteps[i] to timesteps[i-1] with beta'_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}]
    (Nichol & Dhariwal 2021, sec. 4), so alpha_bar'_i = alpha_bar[t_i]. Needs a concrete
    schedule (call it outside jit); computed in float64 from the stored betas."""
    timesteps = np.asarray(timesteps)
    alpha_bars = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))[timesteps]
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    return schedule_from_betas(1.0 - alpha_bars / alpha_bars_prev)
