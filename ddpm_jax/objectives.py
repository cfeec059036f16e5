"""What the network predicts and how the loss weighs each t: pure functions over the schedule.

With x_t = a x0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), a^2 + s^2 = 1):
    'eps' (Ho et al. 2020): the network predicts eps;
    'v'   (Salimans & Ho 2022): it predicts v = a eps - s x0, so that
          eps = a v + s x_t  and  x0 = a x_t - s v.
Every sampler works on eps (`to_eps`), so every prediction target works with every sampler.

Loss weighting, on the MSE of the prediction: 'none' (L_simple), or
'min_snr' (Hang et al. 2023): min(SNR_t, gamma) expressed for the target, with
SNR_t = alpha_bar_t / (1 - alpha_bar_t): min(SNR, gamma) / SNR for eps and
min(SNR, gamma) / (SNR + 1) for v (the same weight on the implied x0 error).
"""

from __future__ import annotations

import jax.numpy as jnp

from ddpm_jax.errors import UserError
from ddpm_jax.schedule import Schedule, _at

PREDICTIONS = ("eps", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")


def check_objective(prediction: str, loss_weighting: str = "none", snr_gamma: float = 5.0) -> None:
    if prediction not in PREDICTIONS:
        raise UserError(f"--config.diffusion.prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise UserError(f"--config.diffusion.loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                        f"got {loss_weighting!r}")
    if not snr_gamma > 0:
        raise UserError(f"--config.diffusion.snr_gamma must be > 0, got {snr_gamma}")


def target(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, prediction: str) -> jnp.ndarray:
    """What the network learns to output for x_t = q_sample(schedule, x0, t, noise). Shapes (B, H, W, C)."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return (_at(schedule.sqrt_alpha_bars, t, x0.ndim) * noise
                - _at(schedule.sqrt_one_minus_alpha_bars, t, x0.ndim) * x0)
    raise UserError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


def to_eps(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, output: jnp.ndarray, prediction: str) -> jnp.ndarray:
    """The eps a network output stands for, at x_t (B, H, W, C) and t (B,) int."""
    if prediction == "eps":
        return output
    if prediction == "v":
        return (_at(schedule.sqrt_alpha_bars, t, x_t.ndim) * output
                + _at(schedule.sqrt_one_minus_alpha_bars, t, x_t.ndim) * x_t)
    raise UserError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


def snr(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """alpha_bar_t / (1 - alpha_bar_t), shape of t."""
    ab = schedule.alpha_bars[t]
    return ab / (1.0 - ab)


def loss_weights(schedule: Schedule, t: jnp.ndarray, prediction: str, loss_weighting: str,
                 snr_gamma: float = 5.0) -> jnp.ndarray:
    """The weight of each example's MSE, shape (B,) for t (B,): ones for 'none'."""
    if loss_weighting == "none":
        return jnp.ones(t.shape, jnp.float32)
    if loss_weighting == "min_snr":
        ratio = snr(schedule, t)
        clipped = jnp.minimum(ratio, snr_gamma)
        return clipped / ratio if prediction == "eps" else clipped / (ratio + 1.0)
    raise UserError(f"unknown loss_weighting {loss_weighting!r}: use one of {', '.join(LOSS_WEIGHTINGS)}")
