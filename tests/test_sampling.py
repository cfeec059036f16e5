import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.errors import UserError
from ddpm_jax.sampling import (_reverse_process, chain, frame_steps, guided_output, initial_noise_and_step_keys,
                               reverse_step, reverse_stddevs, sample, sample_batched, sample_keys)
from ddpm_jax.schedule import linear_beta_schedule, respace, respaced_timesteps, spaced_timesteps

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


def chain_alpha_bars(steps=T):
    """alpha_bar of the chain's steps in float64 (the respaced chain keeps alpha_bar at its timesteps)."""
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    return ab[respaced_timesteps(T, steps)]


def scalar_recursion(mu, s, sigma, steps=T):
    """Mean and variance of the DDPM sampler's output, pushed through the same update rule in float64."""
    ab = chain_alpha_bars(steps)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    betas = 1 - ab / ab_prev
    alphas = 1 - betas
    var_noise = betas if sigma == "beta" else (1 - ab_prev) / (1 - ab) * betas
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for t in range(len(ab) - 1, -1, -1):
        c1 = np.sqrt(1 - ab[t]) / (ab[t] * s * s + 1 - ab[t])  # eps = c1 (x - sqrt(ab) mu)
        e = betas[t] / np.sqrt(1 - ab[t])
        gain = (1 - e * c1) / np.sqrt(alphas[t])
        offset = e * c1 * np.sqrt(ab[t]) * mu / np.sqrt(alphas[t])
        m = gain * m + offset
        v = gain * gain * v + (var_noise[t] if t > 0 else 0.0)
    return m, v


def ddim_affine_map(mu, s, steps):
    """DDIM with eta = 0 is deterministic and affine: x0 = gain * x_T + offset, in float64."""
    ab = chain_alpha_bars(steps)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    gain, offset = 1.0, 0.0
    for i in range(len(ab) - 1, -1, -1):
        c1 = np.sqrt(1 - ab[i]) / (ab[i] * s * s + 1 - ab[i])
        # eps = c1 x - c1 sqrt(ab) mu; x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab)
        x0_gain, x0_off = (1 - np.sqrt(1 - ab[i]) * c1) / np.sqrt(ab[i]), np.sqrt(1 - ab[i]) * c1 * mu
        step_gain = np.sqrt(ab_prev[i]) * x0_gain + np.sqrt(1 - ab_prev[i]) * c1
        step_off = np.sqrt(ab_prev[i]) * x0_off - np.sqrt(1 - ab_prev[i]) * c1 * np.sqrt(ab[i]) * mu
        gain, offset = step_gain * gain, step_gain * offset + step_off
    return gain, offset


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


@pytest.mark.parametrize("sampler,steps", [("ddpm", T), ("ddim", 40)])
def test_fori_loop_equals_python_loop(schedule, sampler, steps):
    params = gaussian_params(schedule, 0.1, 0.5)
    keys = sample_keys(jax.random.key(11), 0, 3)
    options = dict(sampler=sampler, sigma="beta_tilde", eta=0.5)
    x_loop, frames = sample(gaussian_eps, params, schedule, keys, (28, 28, 1), steps=steps, num_frames=5, **options)

    chain_schedule, timesteps = chain(schedule, steps)
    step = jax.jit(functools.partial(reverse_step, **options), static_argnums=0)
    x, step_keys = initial_noise_and_step_keys(keys, (28, 28, 1))
    recorded = []
    wanted = set(frame_steps(steps, 5).tolist())
    for loop_index, i in enumerate(range(steps - 1, -1, -1)):
        x, _ = step(gaussian_eps, params, chain_schedule, timesteps, x, i, step_keys)
        if loop_index in wanted:
            recorded.append(x)
    np.testing.assert_allclose(x_loop, x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frames, np.stack(recorded), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(frames[-1], x_loop)


@pytest.mark.parametrize("steps", [T, 100, 20])
@pytest.mark.parametrize("mu,s", [(0.5, 1.0), (0.2, 0.1)])
def test_ddim_eta0_is_the_exact_affine_map_of_the_noise(schedule, steps, mu, s):
    keys = sample_keys(jax.random.key(3), 0, 16)
    x0, _ = sample(gaussian_eps, gaussian_params(schedule, mu, s), schedule, keys, (28, 28, 1),
                   sampler="ddim", steps=steps, eta=0.0)
    x_T, _ = initial_noise_and_step_keys(keys, (28, 28, 1))
    gain, offset = ddim_affine_map(mu, s, steps)
    np.testing.assert_allclose(np.asarray(x0, np.float64), gain * np.asarray(x_T, np.float64) + offset,
                               rtol=0, atol=2e-4 * max(1.0, abs(gain)))
    # So its mean and variance are the recursion's: mu, and (gain)^2, which is s^2 to first order.
    draws = np.asarray(x0, np.float64).ravel()
    assert abs(draws.mean() - offset) < 5 * abs(gain) / np.sqrt(draws.size)
    assert abs(draws.var() - gain**2) < 5 * gain**2 * np.sqrt(2 / draws.size)


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_respaced_ddpm_matches_its_gaussian_recursion(schedule, sigma):
    mu, s, steps = -0.3, 0.5, 50
    x0, _ = sample(gaussian_eps, gaussian_params(schedule, mu, s), schedule, sample_keys(jax.random.key(8), 0, 64),
                   (28, 28, 1), steps=steps, sigma=sigma)
    draws = np.asarray(x0, np.float64).ravel()
    m, v = scalar_recursion(mu, s, sigma, steps)
    assert abs(draws.mean() - m) < 5 * np.sqrt(v / N_DRAWS)
    assert abs(draws.var() - v) < 5 * v * np.sqrt(2 / N_DRAWS)


def test_ddim_eta1_is_ddpm_with_beta_tilde(schedule):
    # Song et al.: eta = 1 gives the DDPM posterior with sigma^2 = beta-tilde; same keys, same samples.
    params, keys = gaussian_params(schedule, 0.2, 0.4), sample_keys(jax.random.key(2), 0, 4)
    for steps in (T, 25):
        ddim, _ = sample(gaussian_eps, params, schedule, keys, (28, 28, 1), sampler="ddim", eta=1.0, steps=steps)
        ddpm, _ = sample(gaussian_eps, params, schedule, keys, (28, 28, 1), sigma="beta_tilde", steps=steps)
        np.testing.assert_allclose(ddim, ddpm, rtol=0, atol=2e-4)


def test_respacing(schedule):
    np.testing.assert_array_equal(respaced_timesteps(T, T), np.arange(T))
    np.testing.assert_array_equal(respaced_timesteps(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(respaced_timesteps(T, 1), [T - 1])
    for bad in (0, T + 1, 2.5):
        with pytest.raises(UserError):
            respaced_timesteps(T, bad)
    same = respace(schedule, np.arange(T))
    for name in ("betas", "alpha_bars", "posterior_variance"):
        np.testing.assert_allclose(getattr(same, name), getattr(schedule, name), rtol=1e-5)
    short = respace(schedule, respaced_timesteps(T, 50))
    np.testing.assert_allclose(short.alpha_bars, schedule.alpha_bars[respaced_timesteps(T, 50)], rtol=1e-5)
    assert float(short.posterior_variance[0]) == 0.0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_keeps_samples_in_range(schedule, sampler):
    # Data far outside [-1, 1]: unclipped samples leave the range, clipped ones end in it.
    params, keys = gaussian_params(schedule, 3.0, 0.5), sample_keys(jax.random.key(4), 0, 2)
    free, _ = sample(gaussian_eps, params, schedule, keys, (28, 28, 1), sampler=sampler, steps=20)
    clipped, _ = sample(gaussian_eps, params, schedule, keys, (28, 28, 1), sampler=sampler, steps=20, clip_x0=True)
    assert float(jnp.max(free)) > 2.0
    assert float(jnp.max(clipped)) <= 1.0 and float(jnp.min(clipped)) >= -1.0


def labelled_eps(params, x, t, y=None):
    """A toy conditional predictor: eps = x - c_y, with c = 0 for 'no label' (None or -1)."""
    if y is None:
        return x
    return x - jnp.where(y < 0, 0.0, params["centres"][jnp.maximum(y, 0)]).reshape(-1, 1, 1, 1)


def test_classifier_free_guidance_mixes_conditional_and_unconditional():
    params = {"centres": jnp.array([0.5, -1.0])}
    x, t, y = jnp.ones((2, 2, 2, 1)), jnp.zeros((2,), jnp.int32), jnp.array([0, 1])
    np.testing.assert_allclose(guided_output(labelled_eps, params, x, t, None, 0.0, guided=False), x)
    np.testing.assert_allclose(guided_output(labelled_eps, params, x, t, y, 0.0, guided=False)[:, 0, 0, 0], [0.5, 2.0])
    # (1 + w) eps_c - w eps_u = x - (1 + w) c_y, both halves from one call on the doubled batch.
    calls = []

    def counted(*args):
        calls.append(args[1].shape[0])
        return labelled_eps(*args)

    np.testing.assert_allclose(guided_output(counted, params, x, t, y, 2.0, guided=True)[:, 0, 0, 0], [-0.5, 4.0])
    assert calls == [4]


def test_sample_batched_with_labels_does_not_depend_on_batch(schedule):
    params = {"centres": jnp.array([0.5, -1.0, 0.0])}
    labels = np.array([0, 1, 2, 1, 0])
    opts = dict(sampler="ddim", steps=10, guidance=1.0, labels=labels)
    whole, _ = sample_batched(labelled_eps, params, schedule, jax.random.key(1), 5, (4, 4, 1), batch_size=5, **opts)
    parts, _ = sample_batched(labelled_eps, params, schedule, jax.random.key(1), 5, (4, 4, 1), batch_size=2, **opts)
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError):
        sample_batched(labelled_eps, params, schedule, jax.random.key(1), 5, (4, 4, 1), batch_size=2,
                       labels=labels[:3])


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
    size = _reverse_process._cache_size()
    out_a, out_b, out_c = draw(0.4, 0.3, 1), draw(0.4, 0.3, 1), draw(0.4, 0.3, 2)
    assert _reverse_process._cache_size() == size
    np.testing.assert_array_equal(out_a, out_b)  # same key, same samples
    assert not np.allclose(out_a, out_c)


def test_a_sample_does_not_depend_on_the_batch_it_is_drawn_in(schedule):
    params = gaussian_params(schedule, 0.2, 0.5)
    key = jax.random.key(5)
    whole, _ = sample(gaussian_eps, params, schedule, sample_keys(key, 0, 4), (28, 28, 1))
    part, _ = sample(gaussian_eps, params, schedule, sample_keys(key, 2, 2), (28, 28, 1))
    np.testing.assert_allclose(part, whole[2:], rtol=1e-6, atol=1e-6)


def _exact_ode_then_denoise(xT, mu, s, timesteps):
    """The exact probability-flow ODE solution for N(mu, s^2) data from x_T (at timesteps[-1]) to
    timesteps[0], then the same final x0 estimate every sampler ends with, in float64. For
    Gaussian data the flow maps the standardised value z = (x_t - sqrt(ab) mu) / sqrt(ab s^2 + 1 - ab)
    unchanged from one t to another (per pixel, monotone, matching the marginals)."""
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    t0, t_last = timesteps[0], timesteps[-1]
    z = (xT - np.sqrt(ab[t_last]) * mu) / np.sqrt(ab[t_last] * s * s + 1 - ab[t_last])
    x_t0 = np.sqrt(ab[t0]) * mu + np.sqrt(ab[t0] * s * s + 1 - ab[t0]) * z
    eps = np.sqrt(1 - ab[t0]) * (x_t0 - np.sqrt(ab[t0]) * mu) / (ab[t0] * s * s + 1 - ab[t0])
    return (x_t0 - np.sqrt(1 - ab[t0]) * eps) / np.sqrt(ab[t0])


def test_dpmpp_2m_converges_at_second_order_and_ddim_at_first(schedule):
    mu, s = 0.3, 0.5
    params, keys = gaussian_params(schedule, mu, s), sample_keys(jax.random.key(0), 0, 8)
    x_T, _ = initial_noise_and_step_keys(keys, (8, 8, 1))
    errors = {}
    for sampler in ("ddim", "dpmpp_2m"):
        errors[sampler] = []
        for steps in (10, 20, 40, 80):
            exact = _exact_ode_then_denoise(np.asarray(x_T, np.float64), mu, s,
                                            spaced_timesteps(schedule, steps, "logsnr"))
            x0, _ = sample(gaussian_eps, params, schedule, keys, (8, 8, 1), sampler=sampler, steps=steps,
                           spacing="logsnr")
            errors[sampler].append(np.abs(np.asarray(x0, np.float64) - exact).max())
    ddim, dpm = np.array(errors["ddim"]), np.array(errors["dpmpp_2m"])
    # Halving the step size halves DDIM's error (order 1) and quarters DPM-Solver++(2M)'s (order 2).
    assert np.all((ddim[:-1] / ddim[1:] > 1.8) & (ddim[:-1] / ddim[1:] < 2.2)), ddim
    assert np.all(dpm[1:-1] / dpm[2:] > 3.3), dpm
    assert np.all(dpm < ddim / 4), (dpm, ddim)


def gaussian_v(params, x, t):
    """The exact v for the same Gaussian data: v = (eps - sqrt(1 - ab) x_t) / sqrt(ab)."""
    ab = params["alpha_bars"][t].reshape(-1, 1, 1, 1)
    return (gaussian_eps(params, x, t) - jnp.sqrt(1 - ab) * x) / jnp.sqrt(ab)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_a_v_predicting_network_samples_like_its_eps_twin(schedule, sampler):
    params, keys = gaussian_params(schedule, -0.2, 0.6), sample_keys(jax.random.key(9), 0, 4)
    options = dict(sampler=sampler, steps=20, sigma="beta_tilde")
    by_eps, _ = sample(gaussian_eps, params, schedule, keys, (4, 4, 1), **options)
    by_v, _ = sample(gaussian_v, params, schedule, keys, (4, 4, 1), prediction="v", **options)
    np.testing.assert_allclose(by_v, by_eps, rtol=1e-4, atol=1e-4)


def test_guidance_weight_is_traced_and_frames_hold_only_recorded_samples(schedule):
    params = {"centres": jnp.array([0.5, -1.0, 0.0])}
    keys, labels = sample_keys(jax.random.key(1), 0, 6), jnp.array([0, 1, 2, 0, 1, 2])

    def draw(w, **kw):
        return sample(labelled_eps, params, schedule, keys, (4, 4, 1), sampler="dpmpp_2m", steps=8, labels=labels,
                      guidance=w, **kw)

    draw(1.0)
    size = _reverse_process._cache_size()
    a, b = draw(2.0)[0], draw(3.0)[0]
    assert _reverse_process._cache_size() == size  # a new weight w does not recompile
    assert not np.allclose(a, b)
    x0, frames = draw(2.0, num_frames=3, frames_for=2)
    assert frames.shape == (3, 2, 4, 4, 1)  # the buffer holds the recorded samples only
    np.testing.assert_array_equal(frames[-1], x0[:2])


def test_sample_batched_records_frames_of_the_first_samples_only(schedule):
    params, key = gaussian_params(schedule, 0.1, 0.5), jax.random.key(4)
    options = dict(sampler="ddim", steps=10, num_frames=4)
    x0, frames = sample_batched(gaussian_eps, params, schedule, key, 7, (4, 4, 1), batch_size=2, frames_for=3,
                                **options)
    assert frames.shape == (4, 3, 4, 4, 1)
    np.testing.assert_allclose(frames[-1], x0[:3], rtol=1e-6)
    # Resuming from sample 4 gives samples 4..6 exactly.
    rest, _ = sample_batched(gaussian_eps, params, schedule, key, 7, (4, 4, 1), batch_size=2, start=4, **options)
    np.testing.assert_allclose(rest, x0[4:], rtol=1e-6, atol=1e-6)


def test_sample_options_are_checked_in_one_place(schedule):
    import ml_collections

    from ddpm_jax.sampling import SampleOptions

    config = ml_collections.ConfigDict({"sampler": "ddim", "steps": 50, "sigma": "beta", "eta": 0.0,
                                        "clip_x0": False, "guidance": 0.0})  # an old config: no spacing
    options = SampleOptions.from_config(config, steps=None, guidance=2.0)
    assert (options.sampler, options.steps, options.guidance, options.spacing) == ("ddim", 50, 2.0, "linear")
    for bad in (dict(sampler="euler"), dict(steps=T + 1), dict(steps=-1), dict(steps=2.5), dict(eta=1.5),
                dict(guidance=-1.0), dict(sigma="big"), dict(spacing="cubic")):
        with pytest.raises(UserError, match=next(iter(bad))):
            SampleOptions(**bad).validate(T)


@pytest.mark.parametrize("spacing", ["linear", "quadratic", "logsnr"])
@pytest.mark.parametrize("steps", [2, 10, 25, 999, T])
def test_spaced_timesteps_are_distinct_and_span_the_chain(schedule, spacing, steps):
    t = spaced_timesteps(schedule, steps, spacing)
    assert len(t) == steps and t[0] == 0 and t[-1] == T - 1 and np.all(np.diff(t) > 0)


def test_logsnr_spacing_is_even_in_log_snr(schedule):
    t = spaced_timesteps(schedule, 10, "logsnr")
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t]
    gaps = np.diff(0.5 * np.log(ab / (1 - ab)))
    # Rounding to integer timesteps moves lambda most where it changes fastest (t near 0).
    assert np.all(np.abs(gaps[1:] / gaps[1:].mean() - 1) < 0.1), gaps
