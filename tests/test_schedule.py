import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.errors import UserError
from ddpm_jax.schedule import (cosine_beta_schedule, linear_beta_schedule, make_schedule, posterior_mean, predict_x0, q_sample,
                               reverse_mean, schedule_from_betas)


@pytest.fixture(scope="module")
def schedule():
    return linear_beta_schedule(1000, 1e-4, 0.02)


def test_linear_schedule_golden_values(schedule):
    # Closed-form values for Ho et al.'s schedule (T = 1000, betas 1e-4 .. 0.02).
    np.testing.assert_allclose(schedule.alpha_bars[999], 4.036e-5, rtol=1e-3)
    np.testing.assert_allclose(schedule.posterior_variance[487], 0.0097916, rtol=1e-3)
    np.testing.assert_allclose(schedule.posterior_variance[999], 0.0199999, rtol=1e-3)
    assert float(schedule.posterior_variance[0]) == 0.0
    assert float(schedule.alpha_bars_prev[0]) == 1.0
    np.testing.assert_allclose(schedule.betas[0], 1e-4, rtol=1e-6)
    np.testing.assert_allclose(schedule.betas[-1], 0.02, rtol=1e-6)
    assert schedule.n_steps == 1000
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(schedule))


def test_schedule_matches_float64_recomputation(schedule):
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bars = np.cumprod(1 - betas)
    prev = np.concatenate([[1.0], alpha_bars[:-1]])
    np.testing.assert_allclose(schedule.alpha_bars, alpha_bars, rtol=2e-6)
    np.testing.assert_allclose(schedule.alpha_bars_prev[1:], alpha_bars[:-1], rtol=2e-6)
    np.testing.assert_allclose(schedule.posterior_variance, (1 - prev) / (1 - alpha_bars) * betas, rtol=2e-6)
    np.testing.assert_allclose(schedule.eps_coefs, betas / np.sqrt(1 - alpha_bars), rtol=2e-6)
    # x0 coefficient of the posterior mean is exactly 1 at t = 0, the x_t coefficient 0.
    np.testing.assert_allclose(schedule.posterior_mean_coef_x0[0], 1.0, rtol=1e-6)
    assert float(schedule.posterior_mean_coef_xt[0]) == 0.0


def test_q_sample_moments(schedule):
    c = 0.7
    n = 200_000
    for t_value in (0, 250, 999):
        t = jnp.full((n,), t_value)
        x0 = jnp.full((n, 1, 1, 1), c)
        noise = jax.random.normal(jax.random.key(t_value), x0.shape)
        x_t = np.asarray(q_sample(schedule, x0, t, noise), np.float64)
        ab = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t_value])
        var = 1 - ab
        se_mean = np.sqrt(var / n)
        assert abs(x_t.mean() - np.sqrt(ab) * c) < 5 * se_mean
        assert abs(x_t.var() - var) < 5 * var * np.sqrt(2 / n)


def test_x0_estimate_inverts_q_sample_and_reverse_mean_is_posterior_mean(schedule):
    key_x, key_n, key_t = jax.random.split(jax.random.key(1), 3)
    x0 = jax.random.uniform(key_x, (16, 4, 4, 1), minval=-1, maxval=1)
    noise = jax.random.normal(key_n, x0.shape)
    t = jax.random.randint(key_t, (16,), 0, 1000).at[0].set(0).at[1].set(999)
    x_t = q_sample(schedule, x0, t, noise)
    np.testing.assert_allclose(predict_x0(schedule, x_t, t, noise), x0, atol=2e-3)
    # Algorithm 2's mean is the posterior mean evaluated at the x0 estimate (Ho et al. eq. 11 vs 7).
    np.testing.assert_allclose(reverse_mean(schedule, x_t, t, noise),
                               posterior_mean(schedule, predict_x0(schedule, x_t, t, noise), x_t, t),
                               rtol=1e-3, atol=2e-3)
    # At t = 0 the posterior mean is x0 itself.
    np.testing.assert_allclose(posterior_mean(schedule, x0, x_t, t)[0], x0[0], atol=1e-6)


@pytest.mark.parametrize("betas", [[], [0.0, 0.1], [0.5, 1.0]])
def test_bad_betas_are_refused(betas):
    with pytest.raises(UserError):
        schedule_from_betas(betas)


def test_cosine_schedule_golden_values():
    # Nichol & Dhariwal (2021) eq. 17 with s = 0.008, T = 1000, betas clipped at 0.999.
    schedule = cosine_beta_schedule(1000)
    np.testing.assert_allclose(schedule.betas[0], 4.1284e-5, rtol=1e-3)
    np.testing.assert_allclose(schedule.betas[499], 0.0031459, rtol=1e-3)
    np.testing.assert_allclose(schedule.betas[998], 0.75, rtol=1e-3)
    np.testing.assert_allclose(schedule.betas[999], 0.999, rtol=1e-6)  # clipped
    np.testing.assert_allclose(schedule.alpha_bars[499], 0.49384, rtol=1e-3)  # about half-way at T/2
    assert float(schedule.posterior_variance[0]) == 0.0
    assert np.all(np.diff(np.asarray(schedule.alpha_bars)) < 0)


def test_make_schedule_names():
    config = ml_collections.ConfigDict({"schedule": "cosine", "n_steps": 100, "beta_min": 1e-4, "beta_max": 0.02})
    np.testing.assert_array_equal(make_schedule(config).betas, cosine_beta_schedule(100).betas)
    config.schedule = "linear"
    np.testing.assert_array_equal(make_schedule(config).betas, linear_beta_schedule(100).betas)
    config.schedule = "sigmoid"
    with pytest.raises(UserError, match="cosine"):
        make_schedule(config)
