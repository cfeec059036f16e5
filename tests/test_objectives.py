"""objectives.py: eps <-> v <-> x0 identities and the min-SNR weights at chosen t, against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.errors import UserError
from ddpm_jax.objectives import check_objective, loss_weights, snr, target, to_eps
from ddpm_jax.schedule import linear_beta_schedule, predict_x0, q_sample


@pytest.fixture(scope="module")
def schedule():
    return linear_beta_schedule(1000, 1e-4, 0.02)


def test_eps_v_x0_round_trips(schedule):
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(k1, (6, 4, 4, 1), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 250, 500, 998, 999])
    x_t = q_sample(schedule, x0, t, noise)
    assert np.allclose(target(schedule, x0, t, noise, "eps"), noise)
    v = target(schedule, x0, t, noise, "v")
    # v = sqrt(ab) eps - sqrt(1 - ab) x0, from the float64 schedule.
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(v, np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0, rtol=1e-5, atol=1e-6)
    # v -> eps -> x0 gives back what made x_t.
    eps = to_eps(schedule, x_t, t, v, "v")
    np.testing.assert_allclose(eps, noise, atol=2e-5)
    # (not at t = 999, where dividing by sqrt(alpha_bar) = 0.0064 magnifies float32 rounding)
    np.testing.assert_allclose(predict_x0(schedule, x_t[:5], t[:5], eps[:5]), x0[:5], atol=2e-3)
    assert np.allclose(to_eps(schedule, x_t, t, noise, "eps"), noise)


def test_min_snr_weights_at_chosen_t(schedule):
    t = jnp.array([0, 99, 199, 999])
    # SNR_0 = 0.9999 / 1e-4 = 9999; SNR_999 = alpha_bar_999 / (1 - alpha_bar_999), alpha_bar_999 = 4.0358e-5.
    np.testing.assert_allclose(np.asarray(snr(schedule, t))[[0, 3]], [9999.0, 4.03599e-5], rtol=2e-3)
    w_eps = loss_weights(schedule, t, "eps", "min_snr", 5.0)
    w_v = loss_weights(schedule, t, "v", "min_snr", 5.0)
    # eps: min(SNR, 5) / SNR; v: min(SNR, 5) / (SNR + 1).
    np.testing.assert_allclose(w_eps, [5 / 9999, 0.574023, 1.0, 1.0], rtol=2e-3)
    np.testing.assert_allclose(w_v, [5 / 10000, 0.514909, 0.659039, 4.0358e-5], rtol=2e-3)
    np.testing.assert_array_equal(loss_weights(schedule, t, "eps", "none"), np.ones(4))


def test_bad_objectives_are_refused():
    check_objective("v", "min_snr", 5.0)
    for args in (("x0",), ("eps", "p2"), ("eps", "min_snr", 0.0)):
        with pytest.raises(UserError):
            check_objective(*args)


def test_diffusion_loss_weighs_each_example_by_its_target(schedule):
    from ddpm_jax.training import diffusion_loss, loss_keys

    def zero_net(variables, x, t, labels, train, rngs):
        return jnp.zeros_like(x)

    x0 = jnp.linspace(-1, 1, 3 * 16).reshape(3, 4, 4, 1)
    key = jax.random.key(3)
    keys = loss_keys(key)
    t = jax.random.randint(keys["t"], (3,), 0, 1000)
    noise = jax.random.normal(keys["noise"], x0.shape)
    for prediction in ("eps", "v"):
        goal = np.asarray(target(schedule, x0, t, noise, prediction))
        plain = diffusion_loss({}, zero_net, schedule, x0, key, prediction=prediction)
        np.testing.assert_allclose(plain, np.mean(goal**2), rtol=1e-5)
        weighted = diffusion_loss({}, zero_net, schedule, x0, key, prediction=prediction, loss_weighting="min_snr")
        w = np.asarray(loss_weights(schedule, t, prediction, "min_snr"))
        np.testing.assert_allclose(weighted, np.mean(w * np.mean(goal**2, axis=(1, 2, 3))), rtol=1e-5)
