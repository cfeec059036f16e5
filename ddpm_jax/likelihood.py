"""The variational bound in bits/dim (Ho et al. 2020, eq. 5 and sec. 3.3): a model's negative
log-likelihood bound of real images.

:func:`bits_per_dim`: the negative variational bound L = L_T + sum_{t>=1} L_{t-1} + L_0 per
image, in bits per dimension, with the discretised Gaussian decoder (eq. 13). Timesteps are
0-based as everywhere in this package: index t here is Ho et al.'s t + 1, so index 0 is the
decoder term -log p(x_0 | x_1), index t >= 1 is KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1}))
(their L_t), and the prior term L_T = KL(q(x_T | x_0) || N(0, I)) uses alpha_bar at index T-1.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.batching import batched
from ddpm_jax.data import to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.metrics import check_images
from ddpm_jax.objectives import to_eps
from ddpm_jax.sampling import SIGMAS, EpsFn
from ddpm_jax.schedule import Schedule, posterior_mean, predict_x0, q_sample, reverse_mean


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasts)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_normal_mass(lower, upper):
    """log(Phi(upper) - Phi(lower)) for lower < upper (standardised), without cancellation:
    in the right tail it is computed as log(Phi(-lower) - Phi(-upper))."""
    flip = (lower + upper) > 0
    lo, hi = jnp.where(flip, -upper, lower), jnp.where(flip, -lower, upper)
    log_hi, log_lo = jax.scipy.special.log_ndtr(hi), jax.scipy.special.log_ndtr(lo)
    return log_hi + jnp.log1p(-jnp.exp(jnp.minimum(log_lo - log_hi, 0.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(pixel) elementwise for x on the 256-level grid of [-1, 1] (bin width 2/255) under
    N(mean, exp(log_scale)^2) integrated over x's bin [x - 1/255, x + 1/255]; the bins of -1
    and +1 extend to -inf and +inf (Ho et al. eq. 13). Exact normal CDF in log space, so
    tiny probabilities stay finite."""
    inv_scale = jnp.exp(-log_scale)
    half = 1.0 / 255.0
    upper = (x - mean + half) * inv_scale
    lower = (x - mean - half) * inv_scale
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)  # x = -1: P(X < -1 + 1/255)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)  # x = +1: P(X > 1 - 1/255)
    return jnp.where(x < -1.0 + half, log_cdf_upper,
                     jnp.where(x > 1.0 - half, log_sf_lower, _log_normal_mass(lower, upper)))


def model_log_variances(schedule: Schedule, sigma: str) -> jnp.ndarray:
    """log sigma_t^2 of p(x_{t-1} | x_t) for t = 0 .. T-1, shape (T,).

    'beta': log beta_t (index 0, the decoder: beta_0, Ho et al.'s sigma_1^2 = beta_1).
    'beta_tilde': log of the posterior variance, whose index 0 is 0: the decoder uses index
    1's value there (as Ho et al.'s code clips it; beta_0 when T = 1).
    """
    if sigma == "beta":
        return jnp.log(schedule.betas)
    if sigma == "beta_tilde":
        return posterior_log_variances(schedule)
    raise UserError(f"unknown sigma {sigma!r}: use 'beta' or 'beta_tilde'")


def posterior_log_variances(schedule: Schedule) -> jnp.ndarray:
    """log of q(x_{t-1} | x_t, x_0)'s variance, (T,), index 0 (= 0, unused by the bound) set to
    index 1's value so the log stays finite."""
    variances = schedule.posterior_variance
    first = variances[1] if variances.shape[0] > 1 else schedule.betas[0]
    return jnp.log(variances.at[0].set(first))


def prior_kl(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image, nats, (B,) for x0 (B, H, W, C)."""
    last = schedule.n_steps - 1
    mean = schedule.sqrt_alpha_bars[last] * x0
    logvar = jnp.log1p(-schedule.alpha_bars[last])
    kl = normal_kl(mean, logvar, 0.0, 0.0)
    return kl.reshape(x0.shape[0], -1).sum(axis=1)


def _vlb_term(eps_fn: EpsFn, params, schedule: Schedule, x0, keys, t, *, sigma: str, clip_x0: bool, prediction: str):
    """The bound's term at 0-based step t for each image, nats, (B,): the decoder's -log
    p(x0 | x_1) at t = 0, else KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); x_t = q_sample
    with noise normal(fold_in(keys[i], t))."""
    batch = x0.shape[0]
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x0.shape[1:], x0.dtype))(keys)
    t_batch = jnp.full((batch,), t, jnp.int32)
    x_t = q_sample(schedule, x0, t_batch, noise)
    eps = to_eps(schedule, x_t, t_batch, eps_fn(params, x_t, t_batch), prediction)
    if clip_x0:
        mean = posterior_mean(schedule, jnp.clip(predict_x0(schedule, x_t, t_batch, eps), -1.0, 1.0), x_t, t_batch)
    else:
        mean = reverse_mean(schedule, x_t, t_batch, eps)
    log_var = model_log_variances(schedule, sigma)[t]
    kl = normal_kl(posterior_mean(schedule, x0, x_t, t_batch), posterior_log_variances(schedule)[t], mean, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    per_dim = jnp.where(t == 0, nll, kl)
    return per_dim.reshape(batch, -1).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("eps_fn", "sigma", "clip_x0", "prediction"))
def vlb_terms(eps_fn: EpsFn, params, schedule: Schedule, x0: jnp.ndarray, keys: jax.Array, *,
              sigma: str = "beta", clip_x0: bool = False, prediction: str = "eps") -> tuple[jnp.ndarray, jnp.ndarray]:
    """Every term of the variational bound for each image, in nats.

    x0: (B, H, W, C) float32 on the 256-level grid of [-1, 1] (to_model_range of uint8);
    keys: (B,) one key per image (term t uses fold_in(keys[i], t)). T model evaluations of
    batch B, one per step, in a lax.map. Returns (terms (B, T): index 0 the decoder NLL L_0,
    index t >= 1 the KL L_t; prior (B,): L_T). The negative bound is terms.sum(1) + prior.
    """
    per_step = jax.lax.map(
        lambda t: _vlb_term(eps_fn, params, schedule, x0, keys, t, sigma=sigma, clip_x0=clip_x0,
                            prediction=prediction),
        jnp.arange(schedule.n_steps))
    return per_step.T, prior_kl(schedule, x0)


class BitsPerDim(NamedTuple):
    """Result of bits_per_dim: every value in bits per dimension (nats / (D ln 2), D = H W C)."""

    per_image: np.ndarray  # (N,) the negative bound of each image
    mean: float  # per_image.mean()
    terms: np.ndarray  # (T,) mean over images of each step's term (index 0 the decoder)
    prior: float  # mean of L_T

def bits_per_dim(eps_fn: EpsFn, params, schedule: Schedule, images_u8, *, key: jax.Array, sigma: str = "beta",
                 clip_x0: bool = False, prediction: str = "eps", batch_size: int = 64,
                 progress: bool = False) -> BitsPerDim:
    """Negative variational bound of uint8 images (N, H, W, C), in bits/dim (Ho et al. eq. 5, 13).

    eps_fn(params, x, t) predicts the noise (for flax: model.apply with params = {'params': ...});
    the reverse variance is beta_t ('beta') or the posterior variance ('beta_tilde');
    clip_x0 computes the model's mean from the x0 estimate clipped to [-1, 1]; prediction: what
    eps_fn outputs, 'eps' or 'v' (objectives.py). Image i
    uses the key fold_in(key, i), so the values do not depend on batch_size. Costs T model
    evaluations per image, batch_size images at a time (batching.batched).
    """
    images_u8 = check_images(images_u8)
    if sigma not in SIGMAS:
        raise UserError(f"unknown sigma {sigma!r}: use 'beta' or 'beta_tilde'")
    n = images_u8.shape[0]
    if n < 1 or batch_size < 1:
        raise UserError(f"need at least one image and batch_size >= 1, got {n} images, batch_size={batch_size}")
    from tqdm.auto import tqdm

    def bound(indices):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)
        return vlb_terms(eps_fn, params, schedule, to_model_range(images_u8[indices]), keys, sigma=sigma,
                         clip_x0=clip_x0, prediction=prediction)

    with tqdm(total=n, desc="Bits/dim", unit="img", disable=not progress, leave=False) as bar:
        terms, priors = batched(bound, n, min(batch_size, n), on_batch=lambda end, rows: bar.update(len(rows[1])))
    terms, priors = terms.astype(np.float64), priors.astype(np.float64)
    scale = 1.0 / (math.prod(images_u8.shape[1:]) * math.log(2.0))
    per_image = (terms.sum(axis=1) + priors) * scale
    return BitsPerDim(per_image=per_image, mean=float(per_image.mean()), terms=terms.mean(axis=0) * scale,
                      prior=float(priors.mean() * scale))
