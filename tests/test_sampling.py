import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.errors import UserError
from ddpm_jax.sampling import (ddpm_step, frame_steps, initial_noise_and_step_keys, reverse_stddevs, sample,
                               sample_keys)
from ddpm_jax.schedule import linear_beta_schedule

T = 1000


@pytest.fixture(scope="module")
def schedule():
    return linear_beta_schedule(T, 1e-4, 0.02)


def gaussian_eps(params, x, t):
    """The exact noise predictor when every pixel of the data is independent N(mu, s^2):
    eps*(x_t, t) = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t s^2 + 1 - ab_t)."""
    ab = params["alpha_bars"][t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * params["mu"]) / (ab * params["s2"] + 1 - ab)


def gaussian_params(schedule, mu, s):
    return {"alpha_bars": schedule.alpha_bars, "mu": jnp.float32(mu), "s2": jnp.float32(s * s)}


def scalar_recursion(mu, s, sigma):
    """Mean and variance of the sampler's output, pushed through the same update rule in float64."""
    betas = np.linspace(1e-4, 0.02, T)
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    var_noise = betas if sigma == "beta" else (1 - ab_prev) / (1 - ab) * betas
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for t in range(T - 1, -1, -1):
        c1 = np.sqrt(1 - ab[t]) / (ab[t] * s * s + 1 - ab[t])  # eps = c1 (x - sqrt(ab) mu)
        e = betas[t] / np.sqrt(1 - ab[t])
        gain = (1 - e * c1) / np.sqrt(alphas[t])
        offset = e * c1 * np.sqrt(ab[t]) * mu / np.sqrt(alphas[t])
        m = gain * m + offset
        v = gain * gain * v + (var_noise[t] if t > 0 else 0.0)
    return m, v


N_DRAWS = 64 * 28 * 28  # every pixel is an independent draw


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
@pytest.mark.parametrize("mu,s", [(0.5, 1.0), (-0.3, 0.5), (0.2, 0.1)])
def test_sampler_matches_exact_gaussian_reverse_process(schedule, sigma, mu, s):
    x0, _ = sample(gaussian_eps, gaussian_params(schedule, mu, s), schedule, sample_keys(jax.random.key(7), 0, 64),
                   (28, 28, 1), sigma=sigma)
    draws = np.asarray(x0, np.float64).ravel()
    m, v = scalar_recursion(mu, s, sigma)
    assert abs(draws.mean() - m) < 5 * np.sqrt(v / N_DRAWS)
    assert abs(draws.var() - v) < 5 * v * np.sqrt(2 / N_DRAWS)
    if s == 1.0 and sigma == "beta":
        # With sigma^2 = beta the reverse kernel is exact for unit-variance Gaussian data.
        assert abs(m - mu) < 1e-3 and abs(v - 1) < 1e-3
        assert abs(draws.mean() - mu) < 5 * np.sqrt(1 / N_DRAWS)
        assert abs(draws.var() - 1) < 5 * np.sqrt(2 / N_DRAWS)


def test_sigma_choices_give_different_variances():
    # Guards the test above: at s = 0.1 the two recursions differ by far more than
    # the tolerance, so a sampler using the wrong sigma fails it.
    _, v_beta = scalar_recursion(0.0, 0.1, "beta")
    _, v_tilde = scalar_recursion(0.0, 0.1, "beta_tilde")
    assert abs(v_beta - v_tilde) > 10 * v_beta * np.sqrt(2 / N_DRAWS)


def test_no_noise_at_t0(schedule):
    for sigma in ("beta", "beta_tilde"):
        sigmas = reverse_stddevs(schedule, sigma)
        assert float(sigmas[0]) == 0.0 and float(sigmas[1]) > 0
    np.testing.assert_allclose(reverse_stddevs(schedule, "beta")[1:], np.sqrt(schedule.betas[1:]))
    with pytest.raises(UserError):
        reverse_stddevs(schedule, "gamma")


def test_fori_loop_equals_python_loop(schedule):
    params = gaussian_params(schedule, 0.1, 0.5)
    keys = sample_keys(jax.random.key(11), 0, 3)
    x_loop, frames = sample(gaussian_eps, params, schedule, keys, (28, 28, 1), sigma="beta_tilde", num_frames=5)

    sigmas = reverse_stddevs(schedule, "beta_tilde")
    step = jax.jit(ddpm_step, static_argnums=0)
    x, step_keys = initial_noise_and_step_keys(keys, (28, 28, 1))
    recorded = []
    wanted = set(frame_steps(T, 5).tolist())
    for i, t in enumerate(range(T - 1, -1, -1)):
        x = step(gaussian_eps, params, schedule, sigmas, x, t, step_keys)
        if i in wanted:
            recorded.append(x)
    np.testing.assert_allclose(x_loop, x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frames, np.stack(recorded), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(frames[-1], x_loop)


def test_frame_steps_are_the_articles():
    # The article records a frame at loop index idx when idx is in
    # np.linspace(0, T, K).astype(np.uint), or when t == 0 (the last step).
    for n_steps, k in ((1000, 100), (1000, 7), (50, 50), (10, 2)):
        article = [idx for idx in range(n_steps)
                   if idx in np.linspace(0, n_steps, k).astype(np.uint) or idx == n_steps - 1]
        np.testing.assert_array_equal(frame_steps(n_steps, k), article)
    np.testing.assert_array_equal(frame_steps(1000, 0), [])
    np.testing.assert_array_equal(frame_steps(1000, 1), [999])
    assert len(frame_steps(1000, 100)) == 100
    with pytest.raises(UserError):
        frame_steps(10, 11)


def test_new_params_and_keys_do_not_recompile(schedule):
    def draw(mu, s, seed):
        return sample(gaussian_eps, gaussian_params(schedule, mu, s), schedule, sample_keys(jax.random.key(seed), 0, 2),
                      (28, 28, 1), num_frames=3)[0]

    draw(0.0, 1.0, 0)
    size = sample._cache_size()
    out_a, out_b, out_c = draw(0.4, 0.3, 1), draw(0.4, 0.3, 1), draw(0.4, 0.3, 2)
    assert sample._cache_size() == size
    np.testing.assert_array_equal(out_a, out_b)  # same key, same samples
    assert not np.allclose(out_a, out_c)


def test_a_sample_does_not_depend_on_the_batch_it_is_drawn_in(schedule):
    params = gaussian_params(schedule, 0.2, 0.5)
    key = jax.random.key(5)
    whole, _ = sample(gaussian_eps, params, schedule, sample_keys(key, 0, 4), (28, 28, 1))
    part, _ = sample(gaussian_eps, params, schedule, sample_keys(key, 2, 2), (28, 28, 1))
    np.testing.assert_allclose(part, whole[2:], rtol=1e-6, atol=1e-6)
