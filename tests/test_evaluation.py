"""ddpm_jax.metrics, .likelihood (bits/dim), .classifier, .evaluation and evaluate.py end-to-end on tfds mock data.

The real-data test runs only when DDPM_JAX_DATA_DIR names a folder holding fashion_mnist/
with the official archives.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from cli_helpers import cli_env, ok, user_error

from ddpm_jax import classifier as cl
from ddpm_jax import evaluation, likelihood, metrics
from ddpm_jax.data import load_split, to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.sampling import sample_keys
from ddpm_jax.schedule import linear_beta_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def correlated_features(n, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


# --------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise_and_shift():
    features = correlated_features(400)
    rng = np.random.default_rng(1)
    noise = rng.normal(size=features.shape)
    for method in ("sqrtm", "eigh"):
        assert metrics.fid(features, features, method=method) < 1e-8
        noised = [metrics.fid(features, features + s * noise, method=method) for s in (0.1, 0.3, 1.0, 3.0)]
        shifted = [metrics.fid(features, features + s, method=method) for s in (0.1, 0.3, 1.0, 3.0)]
        assert noised[0] > 1e-4 and np.all(np.diff(noised) > 0), noised
        # A shift moves only the mean: FID = d * s^2 exactly.
        np.testing.assert_allclose(shifted, [6 * s * s for s in (0.1, 0.3, 1.0, 3.0)], rtol=1e-6)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 5
    # Commuting covariances (same eigenvectors): tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("auto", "sqrtm", "eigh"):
        np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2, method=method), expected, rtol=1e-9)
    # General (non-commuting) covariances: both methods agree with tr((S1 S2)^(1/2)) from the
    # eigenvalues of S1 S2 (real, non-negative).
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, 2 * d))
    s1, s2 = m1 @ m1.T, m2 @ m2.T / 2
    trace = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace
    for method in ("sqrtm", "eigh"):
        np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2, method=method), expected, rtol=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_fid_of_samples_estimates_the_closed_form():
    rng = np.random.default_rng(2)
    d, n = 3, 200_000
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) * 2.0 + 1.0  # N(1, 4 I): FID = d * 1 + d * (2 - 1)^2 = 6
    assert metrics.fid(x, y) == pytest.approx(6.0, rel=0.02)


def test_fid_refuses_fewer_than_two_rows_and_mismatched_widths():
    with pytest.raises(UserError, match="at least 2"):
        metrics.fid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(UserError, match="different widths"):
        metrics.fid(np.zeros((3, 4)), np.zeros((5, 3)))


# --------------------------------------------------------------------------- KID


def test_kid_is_unbiased_for_one_distribution_and_positive_for_shifted_data():
    features = correlated_features(2000, d=8, seed=3)
    features = (features - features.mean(0)) / features.std(0)
    half_a, half_b = features[:1000], features[1000:]
    mean, std = metrics.kid(half_a, half_b, num_subsets=50, subset_size=200, seed=0)
    assert std > 0 and abs(mean) < std, (mean, std)
    mean_shift, std_shift = metrics.kid(half_a, half_b + 0.5, num_subsets=50, subset_size=200, seed=0)
    assert mean_shift > 5 * std_shift and mean_shift > 10 * abs(mean)


def test_mmd2_unbiased_against_a_direct_double_loop():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 1

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


# --------------------------------------------------------------------------- class histogram


def test_class_histogram_and_entropy():
    logits = np.eye(10)[[0, 1, 1, 9]] * 5.0
    np.testing.assert_array_equal(metrics.class_histogram(logits), [1, 2, 0, 0, 0, 0, 0, 0, 0, 1])
    assert metrics.entropy_nats(np.ones(10)) == pytest.approx(math.log(10))
    assert metrics.entropy_nats([0, 0, 7, 0]) == 0.0
    assert metrics.entropy_nats([1, 1, 0, 0]) == pytest.approx(math.log(2))


def test_compare_features_reports_every_figure():
    features = correlated_features(300, d=4)
    logits = np.random.default_rng(0).normal(size=(300, 10))
    report = metrics.compare_features(features, logits, features, kid_subsets=5, kid_subset_size=100)
    assert report["fid"] < 1e-8 and abs(report["kid_mean"]) < 3 * report["kid_std"]
    assert report["num"] == 300 and report["kid_subset_size"] == 100
    assert sum(report["class_histogram"].values()) == pytest.approx(1.0)
    assert 0 < report["class_entropy_nats"] <= math.log(10)


# --------------------------------------------------------------------------- bits/dim: the pieces


def test_normal_kl_closed_form():
    assert float(likelihood.normal_kl(0.0, 0.0, 0.0, 0.0)) == pytest.approx(0.0)
    assert float(likelihood.normal_kl(1.0, 0.0, 0.0, 0.0)) == pytest.approx(0.5)
    # KL(N(0, 4) || N(0, 1)) = (4 - 1 - ln 4) / 2; KL(N(m1, v1) || N(m2, v2)) in general.
    assert float(likelihood.normal_kl(0.0, math.log(4), 0.0, 0.0)) == pytest.approx((4 - 1 - math.log(4)) / 2, rel=1e-6)
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 2.0
    expected = 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    assert float(likelihood.normal_kl(m1, math.log(v1), m2, math.log(v2))) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.5), (0.3, 0.01), (-0.999, 0.002), (1.7, 0.3), (-3.0, 2.0),
                                        (0.5, 1e-4)])
def test_discretized_gaussian_sums_to_one_over_the_256_bins(mean, scale):
    x = to_model_range(np.arange(256, dtype=np.uint8))
    log_p = likelihood.discretized_gaussian_log_likelihood(x, mean, math.log(scale))
    assert np.all(np.isfinite(np.asarray(log_p)))
    assert float(jnp.sum(jnp.exp(log_p))) == pytest.approx(1.0, abs=1e-5)
    # Interior bins against scipy, in float64.
    k = 100
    xk = -1 + 2 * k / 255
    expected = norm.cdf((xk + 1 / 255 - mean) / scale) - norm.cdf((xk - 1 / 255 - mean) / scale)
    if expected > 1e-30:
        assert float(log_p[k]) == pytest.approx(math.log(expected), rel=1e-3, abs=1e-5)


def test_discretized_gaussian_tails_stay_finite():
    """A pixel 200 standard deviations away still has a finite log-probability (no log(0))."""
    x = jnp.array([-1.0, 0.0, 1.0])
    log_p = likelihood.discretized_gaussian_log_likelihood(x, jnp.array([1.0, -1.0, -1.0]), math.log(0.01))
    assert np.all(np.isfinite(np.asarray(log_p))) and np.all(np.asarray(log_p) < -1000)


def test_model_log_variances_guard_the_zero_posterior_variance():
    schedule = linear_beta_schedule(10)
    assert float(schedule.posterior_variance[0]) == 0.0
    tilde = np.asarray(likelihood.model_log_variances(schedule, "beta_tilde"))
    assert np.all(np.isfinite(tilde)) and tilde[0] == tilde[1]
    np.testing.assert_allclose(np.exp(tilde[1:]), np.asarray(schedule.posterior_variance[1:]), rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(likelihood.model_log_variances(schedule, "beta"))),
                               np.asarray(schedule.betas), rtol=1e-6)
    with pytest.raises(UserError, match="sigma"):
        likelihood.model_log_variances(schedule, "bogus")


# --------------------------------------------------------------------------- bits/dim: whole bound


def point_mass_eps(params, x, t):
    """The exact noise predictor when the data is the single image params['x0']:
    eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""
    a = params["sqrt_alpha_bars"][t][:, None, None, None]
    b = params["sqrt_one_minus_alpha_bars"][t][:, None, None, None]
    return (x - a * params["x0"]) / b


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_bits_per_dim_of_the_exact_model_of_a_point_mass_matches_the_closed_form(sigma):
    """Data = one image: the exact eps makes the model's mean the posterior mean, so each KL
    term is the variance-only KL (0 for beta_tilde), the decoder is centred on the pixel, and
    nothing depends on the noise."""
    schedule = linear_beta_schedule(20, 1e-4, 0.2)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 4, 4, 1), dtype=np.uint8)
    image[0, 0, 0, 0], image[0, 1, 1, 0] = 0, 255  # both edge bins
    x0 = np.asarray(to_model_range(image), np.float64)
    params = {"x0": jnp.asarray(x0, jnp.float32), "sqrt_alpha_bars": schedule.sqrt_alpha_bars,
              "sqrt_one_minus_alpha_bars": schedule.sqrt_one_minus_alpha_bars}
    result = likelihood.bits_per_dim(point_mass_eps, params, schedule, np.repeat(image, 3, axis=0),
                                      key=jax.random.key(0), sigma=sigma, batch_size=2)

    d = 16
    betas = np.asarray(schedule.betas, np.float64)
    tilde = np.asarray(schedule.posterior_variance, np.float64)
    model_var = betas if sigma == "beta" else np.concatenate([[tilde[1]], tilde[1:]])
    kl = 0.5 * (np.log(model_var[1:] / tilde[1:]) + tilde[1:] / model_var[1:] - 1) * d
    s = math.sqrt(model_var[0])
    edge = (image[0] == 0) | (image[0] == 255)
    decoder = -np.sum(np.where(edge, norm.logcdf(1 / 255 / s), np.log(2 * norm.cdf(1 / 255 / s) - 1)))
    alpha_bar = np.asarray(schedule.alpha_bars, np.float64)[-1]
    prior = np.sum(0.5 * (-np.log1p(-alpha_bar) + (1 - alpha_bar) + alpha_bar * x0 ** 2 - 1))
    to_bpd = 1 / (d * math.log(2))
    np.testing.assert_allclose(result.terms[1:], kl * to_bpd, rtol=1e-5, atol=3e-7)  # float32 cancellation
    assert result.terms[0] == pytest.approx(decoder * to_bpd, rel=1e-5)
    assert result.prior == pytest.approx(prior * to_bpd, rel=1e-5)
    np.testing.assert_allclose(result.per_image, (kl.sum() + decoder + prior) * to_bpd, rtol=1e-5)
    assert result.mean == pytest.approx(result.per_image.mean())


def scaled_eps(params, x, t):
    """A trivial noise predictor: a * x_t + b * t."""
    return params["a"] * x + params["b"] * t[:, None, None, None].astype(x.dtype)


def numpy_bound_nats(schedule, images_u8, key, a, b, sigma):
    """The same bound in float64 NumPy (same noise, drawn with the same keys): (terms (N, T), prior (N,))."""
    betas = np.asarray(schedule.betas, np.float64)
    n_steps = len(betas)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    tilde = (1 - abar_prev) / (1 - abar) * betas
    model_var = betas if sigma == "beta" else np.concatenate([[tilde[1]], tilde[1:]])
    x0 = (np.asarray(images_u8, np.float64) / 255 - 0.5) * 2
    keys = sample_keys(key, 0, len(images_u8))
    terms = np.zeros((len(images_u8), n_steps))
    for i in range(len(images_u8)):
        for t in range(n_steps):
            noise = np.asarray(jax.random.normal(jax.random.fold_in(keys[i], t), x0.shape[1:]), np.float64)
            xt = np.sqrt(abar[t]) * x0[i] + np.sqrt(1 - abar[t]) * noise
            eps = a * xt + b * t
            mean = (xt - betas[t] / np.sqrt(1 - abar[t]) * eps) / np.sqrt(alphas[t])
            var = model_var[t]
            if t == 0:
                s = np.sqrt(var)
                up = norm.cdf((x0[i] + 1 / 255 - mean) / s)
                lo = norm.cdf((x0[i] - 1 / 255 - mean) / s)
                p = np.where(x0[i] < -0.999, up, np.where(x0[i] > 0.999, 1 - lo, up - lo))
                terms[i, t] = -np.sum(np.log(p))
            else:
                q_mean = (np.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t]) * x0[i]
                          + np.sqrt(alphas[t]) * (1 - abar_prev[t]) / (1 - abar[t]) * xt)
                terms[i, t] = np.sum(0.5 * (np.log(var / tilde[t]) + (tilde[t] + (q_mean - mean) ** 2) / var - 1))
    prior = np.sum(0.5 * (-np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x0 ** 2 - 1), axis=(1, 2, 3))
    return terms, prior


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_bits_per_dim_matches_a_float64_numpy_recomputation(sigma):
    schedule = linear_beta_schedule(10, 1e-3, 0.3)
    images = np.random.default_rng(1).integers(0, 256, (3, 5, 5, 1), dtype=np.uint8)
    images[0, 0, 0, 0], images[1, 2, 2, 0] = 0, 255
    key = jax.random.key(7)
    a, b = 0.4, 0.01
    params = {"a": jnp.float32(a), "b": jnp.float32(b)}
    result = likelihood.bits_per_dim(scaled_eps, params, schedule, images, key=key, sigma=sigma, batch_size=2)
    terms, prior = numpy_bound_nats(schedule, images, key, a, b, sigma)
    to_bpd = 1 / (25 * math.log(2))
    np.testing.assert_allclose(result.per_image, (terms.sum(1) + prior) * to_bpd, rtol=1e-5)
    np.testing.assert_allclose(result.terms, terms.mean(0) * to_bpd, rtol=1e-5)
    assert result.prior == pytest.approx(prior.mean() * to_bpd, rel=1e-5)
    # The values do not depend on the batch size (image i always uses fold_in(key, i)).
    again = likelihood.bits_per_dim(scaled_eps, params, schedule, images, key=key, sigma=sigma, batch_size=3)
    np.testing.assert_allclose(again.per_image, result.per_image, rtol=1e-6)


def test_bits_per_dim_of_a_v_prediction_model_converts_its_output_to_eps():
    schedule = linear_beta_schedule(5, 1e-3, 0.3)
    images = np.random.default_rng(2).integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
    params = {"a": jnp.float32(0.4), "b": jnp.float32(0.01)}

    def scaled_v(params, x, t):  # outputs the v that stands for scaled_eps's eps
        a = schedule.sqrt_alpha_bars[t][:, None, None, None]
        s = schedule.sqrt_one_minus_alpha_bars[t][:, None, None, None]
        eps = scaled_eps(params, x, t)
        return a * eps - s * (x - s * eps) / a

    eps_result = likelihood.bits_per_dim(scaled_eps, params, schedule, images, key=jax.random.key(1))
    v_result = likelihood.bits_per_dim(scaled_v, params, schedule, images, key=jax.random.key(1), prediction="v")
    np.testing.assert_allclose(v_result.per_image, eps_result.per_image, rtol=1e-4)


def test_bits_per_dim_refuses_bad_input():
    schedule = linear_beta_schedule(4)
    params = {"a": jnp.float32(0), "b": jnp.float32(0)}
    with pytest.raises(UserError, match="uint8"):
        likelihood.bits_per_dim(scaled_eps, params, schedule, np.zeros((2, 4, 4, 1), np.float32), key=jax.random.key(0))
    with pytest.raises(UserError, match="sigma"):
        likelihood.bits_per_dim(scaled_eps, params, schedule, np.zeros((2, 4, 4, 1), np.uint8),
                                key=jax.random.key(0), sigma="large")


# --------------------------------------------------------------------------- classifier

TINY = cl.ClassifierConfig(channels=(4, 8), features=16, dropout=0.1, epochs=4, batch_size=20, learning_rate=3e-3)


def separable_images(n, seed):
    """Class k: a bright horizontal bar at rows 2k+4 .. 2k+5 on dim noise. uint8 (n, 28, 28, 1), labels (n,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 4:2 * k + 6] = 230
    return images, labels


def test_classifier_learns_separable_images_and_round_trips_through_its_cache(tmp_path):
    images, labels = separable_images(300, seed=0)
    test_images, test_labels = separable_images(100, seed=1)
    model, params, losses = cl.train_classifier(images, labels, TINY)
    assert len(losses) == 4 and losses[-1] < losses[0]
    features, logits = cl.classifier_outputs(model, params, test_images, batch_size=64)
    assert features.shape == (100, 16) and logits.shape == (100, 10)
    assert cl.accuracy(logits, test_labels) > 0.5  # chance: 0.1
    # Same config and data: same params.
    _, params_again, _ = cl.train_classifier(images, labels, TINY)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params_again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    folder = cl.classifier_dir("fashion_mnist", str(tmp_path))
    assert folder == str(tmp_path / "classifiers" / "fashion_mnist")
    info = cl.classifier_info(TINY, dataset="fashion_mnist", image_shape=(28, 28, 1), num_classes=10,
                              test_accuracy=0.5, train_images=300, train_seconds=1.0, epoch_losses=losses)
    cl.save_classifier(folder, params, info)
    assert cl.has_classifier(folder)
    with pytest.raises(UserError, match="--overwrite"):
        cl.save_classifier(folder, params, info)
    loaded_model, loaded_params, loaded_info = cl.load_classifier(folder)
    assert loaded_info["channels"] == [4, 8] and loaded_info["features"] == 16
    loaded_features, _ = cl.classifier_outputs(loaded_model, loaded_params, test_images, batch_size=64)
    np.testing.assert_array_equal(loaded_features, features)
    cl.save_classifier(folder, params, {**info, "test_accuracy": 0.6}, overwrite=True)
    assert cl.read_classifier_info(folder)["test_accuracy"] == 0.6
    assert sorted(os.listdir(tmp_path / "classifiers")) == ["fashion_mnist"]  # no staging leftovers


def test_cache_root_follows_the_argument_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_JAX_CACHE", str(tmp_path / "env"))
    assert cl.classifier_dir("mnist") == str(tmp_path / "env" / "classifiers" / "mnist")
    assert cl.classifier_dir("mnist", str(tmp_path / "arg")) == str(tmp_path / "arg" / "classifiers" / "mnist")
    monkeypatch.delenv("DDPM_JAX_CACHE")
    assert cl.cache_root() == os.path.expanduser(os.path.join("~", ".cache", "ddpm_jax"))


def test_read_classifier_info_refuses_another_architecture(tmp_path):
    (tmp_path / cl.INFO_FILE).write_text(json.dumps({"architecture": "cnn", "arch_version": 0}))
    with pytest.raises(UserError, match="retrain"):
        cl.read_classifier_info(str(tmp_path))


# --------------------------------------------------------------------------- batching, keys, outputs, resume


def test_classifier_and_bits_per_dim_run_through_batching_batched(monkeypatch):
    from ddpm_jax import batching

    calls = []

    def spy(fn, n, batch_size, **kwargs):
        calls.append((n, batch_size))
        return batching.batched(fn, n, batch_size, **kwargs)

    monkeypatch.setattr(cl, "batched", spy)
    monkeypatch.setattr(likelihood, "batched", spy)
    model = cl.create_classifier(cl.ClassifierConfig(channels=(2,), features=4))
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    params = cl.init_classifier(model, jax.random.key(0), (8, 8, 1))
    features, logits = cl.classifier_outputs(model, params, images, batch_size=2)
    np.testing.assert_allclose(features, cl.classifier_outputs(model, params, images, batch_size=5)[0], rtol=1e-5)
    likelihood.bits_per_dim(scaled_eps, {"a": jnp.float32(0.1), "b": jnp.float32(0)}, linear_beta_schedule(3),
                            images, key=jax.random.key(0), batch_size=2)
    assert calls == [(5, 2), (5, 5), (5, 2)] and features.shape == (5, 4) and logits.shape == (5, 10)


def test_bits_per_dim_noise_shares_no_key_with_the_samples():
    """Sample i uses fold_in(key(seed), i) (sample.py's contract); bits/dim's image i must not reuse
    any of those keys, nor the keys the samples split them into."""
    sample_key, bpd_key = evaluation.streams(3)
    assert np.array_equal(jax.random.key_data(sample_key), jax.random.key_data(jax.random.key(3)))
    samples = sample_keys(sample_key, 0, 300)
    split = jax.random.split(samples[0], 2)  # what sampling derives from each sample key
    image_keys = sample_keys(bpd_key, 0, 300)  # bits_per_dim's image keys: fold_in(key, i)
    every_key = jax.random.key_data(jnp.concatenate([samples, split, image_keys, bpd_key[None]]))
    assert len({tuple(np.asarray(k).ravel()) for k in every_key}) == len(every_key)


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.json"
    evaluation.save_json(str(path), {"a": 1})
    with pytest.raises(TypeError):  # fails while the temporary file is open
        evaluation.save_json(str(path), {"a": 2, "b": object()})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["out.json"]
    from ddpm_jax.generate import save_npz

    save_npz(str(tmp_path / "s"), arr_0=np.zeros(3, np.uint8))  # no .npz appended
    assert sorted(os.listdir(tmp_path)) == ["out.json", "s"]


@pytest.fixture(scope="module")
def tiny_trained():
    from ddpm_jax.config import base_config
    from ddpm_jax.generate import Trained
    from tiny_model import TinyEpsNet

    config = base_config()
    config.diffusion.n_steps = 4
    model = TinyEpsNet()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    return Trained(config=config, model=model, params=params, schedule=linear_beta_schedule(4, 1e-3, 0.2),
                   image_shape=(8, 8, 1), weights="raw", meta={"checkpoint_dir": "tiny"})


def test_interrupted_sampling_resumes_to_the_same_samples(tiny_trained, tmp_path, monkeypatch):
    from ddpm_jax import generate as gen
    from ddpm_jax.data import from_model_range

    options = gen.sample_options(tiny_trained.config)
    expected = from_model_range(gen.generate(tiny_trained, num=5, seed=2, batch_size=2, progress=False)[0])
    resume = str(tmp_path / "out.json.partial.npz")
    real_generate, real_save, starts = gen.generate, gen.save_npz, []

    def spy(*args, **kwargs):
        starts.append(kwargs["start"])
        return real_generate(*args, **kwargs)

    def save_then_interrupt(path, **arrays):  # Ctrl-C right after the first batch is kept
        real_save(path, **arrays)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "generate", spy)
    monkeypatch.setattr(gen, "save_npz", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        evaluation.draw_samples(tiny_trained, 5, options=options, seed=2, batch_size=2, resume_file=resume)
    assert np.array_equal(from_model_range(np.load(resume)["x0"]), expected[:2])
    monkeypatch.setattr(gen, "save_npz", real_save)
    resumed = evaluation.draw_samples(tiny_trained, 5, options=options, seed=2, batch_size=2, resume_file=resume)
    assert starts == [0, 2] and np.array_equal(resumed, expected)
    # Another seed does not take the kept samples.
    other = evaluation.draw_samples(tiny_trained, 5, options=options, seed=3, batch_size=2, resume_file=resume)
    assert starts[-1] == 0 and not np.array_equal(other, expected)


# --------------------------------------------------------------------------- evaluate.py end-to-end

MOCK_EXAMPLES = 64


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = cli_env(tmp_path_factory)
    env["DDPM_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return env


def evaluate(env, *args, mock=True, timeout=600):
    cmd = [sys.executable, "tests/mock_run.py", str(MOCK_EXAMPLES), "evaluate.py"] if mock else [
        sys.executable, "evaluate.py"]
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def mock_split(split):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        return load_split("fashion_mnist", split)


@pytest.fixture(scope="module")
def tiny_classifier(env):
    """A tiny classifier trained by the CLI on mock data (random images and labels) into $DDPM_JAX_CACHE."""
    result = ok(evaluate(env, "--train_classifier", "--dataset=fashion_mnist", "--classifier_epochs=1",
                         "--classifier_channels=4,8", "--classifier_features=16", "--noprogress"))
    folder = os.path.join(env["DDPM_JAX_CACHE"], "classifiers", "fashion_mnist")
    assert "saved to " + folder in result.stderr
    info = json.loads(result.stdout)
    assert info["features"] == 16 and info["channels"] == [4, 8] and info["dataset"] == "fashion_mnist"
    assert 0 <= info["test_accuracy"] <= 1 and info["train_images"] == MOCK_EXAMPLES
    return folder


def test_train_classifier_refuses_to_replace_a_stored_one(env, tiny_classifier):
    user_error(evaluate(env, "--train_classifier", "--dataset=fashion_mnist", mock=False), "exists", "--overwrite")


def test_samples_end_to_end(env, tiny_classifier, tmp_path):
    """The mock test split scores FID ~ 0 against itself; black images and dimmed images do not."""
    test_images, _ = mock_split("test")
    train_images, _ = mock_split("train")
    assert np.array_equal(train_images, test_images)  # tfds' mock serves the same examples for both splits
    same, black, dim = tmp_path / "same.npz", tmp_path / "black.npz", tmp_path / "dim.npz"
    np.savez(same, arr_0=test_images)
    np.savez(black, arr_0=np.zeros_like(test_images[:40]))
    np.savez(dim, arr_0=test_images // 4)
    out = tmp_path / "same.json"
    result = ok(evaluate(env, f"--samples={same}", "--dataset=fashion_mnist", f"--json={out}",
                         "--kid_subsets=10", "--kid_subset_size=32", "--noprogress"))
    report = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report
    assert report["dataset"] == "fashion_mnist" and report["classifier"]["folder"] == tiny_classifier
    samples, real = report["samples"], report["real_reference"]
    assert samples["num"] == MOCK_EXAMPLES and real["num"] == MOCK_EXAMPLES
    assert samples["fid"] < 1e-6 and real["fid"] < 1e-6  # same images (mock train == test)
    assert len(samples["class_histogram"]) == 10 and "T-shirt/top" in samples["class_histogram"]
    assert samples["class_histogram"] == real["class_histogram"]
    assert 0 <= samples["class_entropy_nats"] <= report["max_class_entropy_nats"] == pytest.approx(math.log(10))
    # Refuses to overwrite the JSON.
    user_error(evaluate(env, f"--samples={same}", "--dataset=fashion_mnist", f"--json={out}", mock=False),
               "exists", "--overwrite")

    reports = {}
    for name, path in (("black", black), ("dim", dim)):
        reports[name] = json.loads(ok(evaluate(env, f"--samples={path}", "--dataset=fashion_mnist", "--kid_subsets=10",
                                               "--kid_subset_size=32", "--noprogress")).stdout)
    black, dim = reports["black"], reports["dim"]
    # 40 black images: the reference is 40 of the 64 training images, not all of them.
    assert black["samples"]["num"] == black["real_reference"]["num"] == 40
    assert black["samples"]["fid"] > 10 * black["real_reference"]["fid"] > 0
    assert black["samples"]["kid_mean"] > 3 * black["samples"]["kid_std"]
    assert black["samples"]["class_entropy_nats"] == 0.0  # one image, one class
    assert dim["real_reference"]["fid"] < 1e-6 and dim["samples"]["fid"] > 1e-2
    assert dim["samples"]["kid_mean"] > 3 * dim["samples"]["kid_std"]
    # Identical sets: KID compares random subsets, so it is not exactly 0, but far below the others'.
    assert abs(samples["kid_mean"]) < 0.05 * min(dim["samples"]["kid_mean"], black["samples"]["kid_mean"])


@pytest.mark.parametrize("case", ["missing", "no_arr_0", "float", "3d", "one", "wrong_shape", "not_npz"])
def test_samples_bad_input_is_one_line(env, tiny_classifier, tmp_path, case):
    path = tmp_path / "s.npz"
    images = np.zeros((4, 28, 28, 1), np.uint8)
    if case == "no_arr_0":
        np.savez(path, images=images)
    elif case == "float":
        np.savez(path, arr_0=images.astype(np.float32))
    elif case == "3d":
        np.savez(path, arr_0=images[..., 0])
    elif case == "one":
        np.savez(path, arr_0=images[:1])
    elif case == "wrong_shape":
        np.savez(path, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    elif case == "not_npz":
        path.write_text("not an archive")
    words = {"missing": ["does not exist"], "no_arr_0": ["no arr_0", "images"], "float": ["uint8", "float32"],
             "3d": ["uint8", "(4, 28, 28)"], "one": ["at least 2"], "wrong_shape": ["(32, 32, 3)", "(28, 28, 1)"],
             "not_npz": ["cannot read"]}[case]
    user_error(evaluate(env, f"--samples={path}", "--dataset=fashion_mnist", mock=False), *words)


def test_cli_usage_errors_are_one_line(env, tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    samples = f"--samples={tmp_path / 's.npz'}"
    user_error(evaluate(env, mock=False), "exactly one of")
    user_error(evaluate(env, samples, "--ckpt=x", mock=False), "exactly one of", "--samples and --ckpt")
    user_error(evaluate(env, samples, mock=False), "--dataset")
    unknown = user_error(evaluate(env, samples, "--dataset=no_such_dataset", mock=False), "no_such_dataset")
    assert "--config" not in unknown and "folder" not in unknown  # evaluate.py's flags, and no folder datasets
    empty_cache = str(tmp_path / "empty")
    line = user_error(evaluate(env, samples, "--dataset=mnist", f"--cache_dir={empty_cache}", mock=False),
                      "no mnist classifier", empty_cache)
    assert "python evaluate.py --train_classifier --dataset mnist" in line
    user_error(evaluate(env, "--ckpt=x", "--guidance=-1", mock=False), "guidance")
    user_error(evaluate(env, "--ckpt=x", "--steps=-1", mock=False), "steps")
    # Every sampler of sampling.SAMPLERS is taken (the missing checkpoint is the error).
    assert "sampler" not in user_error(evaluate(env, "--ckpt=x", "--sampler=dpmpp_2m", mock=False), "x")
    user_error(evaluate(env, samples, "--dataset=mnist", "--kid-subsets=5", mock=False), "kid-subsets")


def test_help_says_flags_use_underscores(env):
    text = ok(evaluate(env, "--help", mock=False)).stdout
    assert "underscores" in text and "--bpd_images" in text and "--save_samples" in text
    flag_names = re.findall(r"^\s+--(?:\[no\])?([\w-]+):", text, re.M)
    assert "train_classifier" in flag_names and not [name for name in flag_names if "-" in name]


TINY_UNET = ["--config=configs/tiny.py", "--config.model.name=unet", "--config.model.channels=4",
             "--config.model.channel_mults=(1,)", "--config.model.num_res_blocks=1",
             "--config.model.attention_resolutions=()", "--config.model.num_groups=2", "--config.diffusion.n_steps=8",
             "--config.train.max_steps=2", "--config.train.steps_per_chunk=2"]


def test_ckpt_end_to_end(env, tiny_classifier, tmp_path):
    """Samples from a (barely) trained checkpoint, their metrics, and bits/dim of 3 test images."""
    workdir = tmp_path / "run"
    train = subprocess.run([sys.executable, "tests/mock_run.py", str(MOCK_EXAMPLES), "train.py", *TINY_UNET,
                            f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    saved, out = tmp_path / "samples.npz", tmp_path / "report.json"
    user_error(evaluate(env, f"--ckpt={workdir}", "--steps=9", mock=False), "steps", "model's 8 steps")
    user_error(evaluate(env, f"--ckpt={workdir}", "--dataset=cifar10", mock=False), "trained on fashion_mnist")
    report = json.loads(ok(evaluate(env, f"--ckpt={workdir}", "--num=6", "--batch=4", "--bpd_images=3", "--steps=0",
                                    f"--save_samples={saved}", f"--json={out}", "--kid_subsets=5",
                                    "--noprogress")).stdout)
    assert json.loads(out.read_text()) == report
    assert sorted(os.listdir(tmp_path)) == ["report.json", "run", "samples.npz"]  # no partial or temporary files
    assert report["dataset"] == "fashion_mnist" and report["source"]["sampler"] == "ddpm"
    assert report["samples"]["num"] == report["real_reference"]["num"] == 6
    assert np.isfinite(report["samples"]["fid"]) and report["samples"]["fid"] > report["real_reference"]["fid"]
    assert np.load(saved)["arr_0"].shape == (6, 28, 28, 1)
    bpd = report["bits_per_dim"]
    assert bpd["num_images"] == 3 and bpd["sigma"] == "beta" and bpd["mean"] > 0
    assert bpd["mean"] == pytest.approx(bpd["decoder_L0"] + bpd["kl_terms"] + bpd["prior_LT"], rel=1e-6)
    # The CLI's bits/dim is the library's on the same checkpoint, images and key.
    from ddpm_jax.generate import load_trained

    trained = load_trained(str(workdir))
    images, _ = mock_split("test")
    expected = likelihood.bits_per_dim(trained.eps_fn, trained.params, trained.schedule, images[:3],
                                       key=evaluation.streams(0)[1], batch_size=4)
    assert bpd["mean"] == pytest.approx(expected.mean, rel=1e-5)


# --------------------------------------------------------------------------- other datasets: CIFAR-10


def test_classifier_config_for_each_image_shape():
    assert cl.classifier_config_for((28, 28, 1)) == cl.ClassifierConfig()  # MNIST, Fashion-MNIST: as cached
    cifar = cl.classifier_config_for((32, 32, 3))
    assert (cifar.channels, cifar.features, cifar.random_flip) == ((64, 128, 256), 256, True)  # 4x4 maps at the end
    assert cl.classifier_config_for((64, 64, 3)).channels == (64, 128, 256, 256)
    assert not cl.classifier_config_for((32, 32, 1)).random_flip  # grayscale may be text or digits


def test_random_flips_mirror_about_half_the_images():
    # The classifier flips with the diffusion training's own training.random_flip.
    from ddpm_jax.training import random_flip

    images = np.arange(64 * 4 * 5 * 3, dtype=np.int32).reshape(64, 4, 5, 3)
    out = np.asarray(random_flip(jnp.asarray(images), jax.random.key(0)))
    mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    assert np.all(mirrored != kept) and 16 < mirrored.sum() < 48


def test_cifar10_classifier_and_evaluation_on_mock_data(env, tmp_path, monkeypatch):
    """CIFAR-10 from tfds' mock (random 32x32x3 images, labels 0..9): the classifier takes the
    data's shape and 10 classes and flips its training images (2 steps); its features give the
    metrics, in the library and through evaluate.py --samples."""
    import tensorflow_datasets as tfds

    tfds_dir, cache = str(tmp_path / "tfds"), str(tmp_path / "cache")  # nothing prepared: the mock serves
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        info = evaluation.train_and_store_classifier("cifar10", data_dir=tfds_dir, cache_dir=cache, channels=(4, 8),
                                                     features=16, epochs=2)
        test_images, _ = load_split("cifar10", "test", data_dir=tfds_dir)
        model, params, _ = cl.load_classifier(info["classifier"])
        features, logits = cl.classifier_outputs(model, params, test_images[:5])
    assert info["dataset"] == "cifar10" and info["image_shape"] == [32, 32, 3] and info["num_classes"] == 10
    assert info["channels"] == [4, 8] and info["features"] == 16 and info["random_flip"] and info["epochs"] == 2
    assert test_images.shape == (MOCK_EXAMPLES, 32, 32, 3) and features.shape == (5, 16) and logits.shape == (5, 10)
    assert np.all(np.isfinite(features))

    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=test_images[:40])
    report = json.loads(ok(evaluate(env, f"--samples={path}", "--dataset=cifar10", f"--cache_dir={cache}",
                                    f"--data_dir={tfds_dir}", "--kid_subsets=5", "--kid_subset_size=20",
                                    "--noprogress")).stdout)
    assert report["dataset"] == "cifar10" and report["classifier"]["folder"] == info["classifier"]
    assert report["samples"]["num"] == 40 and np.isfinite(report["samples"]["fid"])
    assert len(report["samples"]["class_histogram"]) == 10
    assert report["max_class_entropy_nats"] == pytest.approx(math.log(10))
    # 28x28 images are not CIFAR-10's.
    np.savez(path, arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    user_error(evaluate(env, f"--samples={path}", "--dataset=cifar10", f"--cache_dir={cache}", mock=False),
               "(28, 28, 1)", "(32, 32, 3)")

    # A checkpoint trained on CIFAR-10 resized to 16x16: refused before sampling, bits/dim alone suggested.
    from ddpm_jax import generate
    from ddpm_jax.config import base_config

    config = base_config()
    config.data.name, config.data.image_size = "cifar10", 16
    resized = generate.Trained(config=config, model=None, params={}, schedule=None, image_shape=(16, 16, 3),
                               weights="raw", meta={})
    monkeypatch.setattr(generate, "load_trained", lambda *args, **kwargs: resized)
    with pytest.raises(UserError, match=r"\(16, 16, 3\).*\(32, 32, 3\).*--num 0"):
        evaluation.evaluate_checkpoint("run", num=4, bpd_images=0, cache_dir=cache, data_dir=tfds_dir)


def test_evaluation_refuses_folder_data():
    with pytest.raises(UserError, match="tfds dataset"):
        evaluation.check_dataset("folder")


# --------------------------------------------------------------------------- real data

def test_real_fashion_mnist_small_classifier_and_reference_fid(real_fashion):
    images, labels = real_fashion.images, real_fashion.labels
    test_images, test_labels = real_fashion.test_images, real_fashion.test_labels
    config = cl.ClassifierConfig(channels=(8, 16), features=32, epochs=3, batch_size=64, learning_rate=2e-3,
                                 train_images=6000)
    model, params, _ = cl.train_classifier(images, labels, config)
    test_features, logits = cl.classifier_outputs(model, params, test_images[:2000])
    assert cl.accuracy(logits, test_labels[:2000]) > 0.7
    train_features, _ = cl.classifier_outputs(model, params, images[-2000:])
    blurred = ((images[-2000:].astype(np.int32) + np.roll(images[-2000:], 1, axis=1)) // 2).astype(np.uint8)
    blurred_features, _ = cl.classifier_outputs(model, params, blurred)
    real_fid = metrics.fid(train_features, test_features)
    assert real_fid < metrics.fid(blurred_features, test_features)


def test_noise_like_share_flags_salt_and_pepper_images():
    from ddpm_jax.metrics import noise_like_share, total_variation

    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (200, 7, 7, 1)), 4, axis=1), 4, axis=2).astype(np.uint8)
    pepper = (rng.integers(0, 2, (10, 28, 28, 1)) * 255).astype(np.uint8)
    assert np.all(total_variation(pepper) > total_variation(smooth).max())
    # Constant images: no variation at all; a checkerboard: 255 everywhere.
    flat, board = np.full((1, 4, 4, 1), 7, np.uint8), (np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)
    np.testing.assert_allclose(total_variation(flat), [0.0])
    np.testing.assert_allclose(total_variation(board[None, :, :, None]), [255.0])
    assert noise_like_share(np.concatenate([smooth[:30], pepper]), smooth) == pytest.approx(10 / 40)
    assert noise_like_share(smooth, smooth) <= 0.005 + 1e-9
