"""Sample quality and likelihood: a small classifier, FID / KID / class entropy on its features,
and the variational bound in bits/dim (Ho et al. 2020, eq. 5 and sec. 3.3).

Classifier
    :class:`Classifier`, a small CNN (flax.linen) trained per dataset by
    :func:`train_classifier` (optax Adam, one jitted step, ``fold_in(key, step)``
    for the dropout noise, ``permutation(fold_in(data_key, epoch))`` for the data
    order). Its penultimate layer (``features``, 128-d, before the ReLU) is the feature
    space of the metrics; its logits give the class histogram. Stored in a cache
    folder (:func:`classifier_dir`, :func:`save_classifier`, :func:`load_classifier`):
    an Orbax checkpoint of the params plus ``classifier.json``.

Metrics (pure NumPy, float64; features ``(N, d)``)
    :func:`fid` (Fréchet distance of Gaussian fits), :func:`kid` (unbiased MMD^2 with the
    cubic polynomial kernel over random subsets, Bińkowski et al. 2018), :func:`class_histogram`
    and :func:`entropy_nats` (natural log: the maximum for 10 classes is ln 10 = 2.303),
    :func:`compare_features` (all of them at once).

Likelihood
    :func:`bits_per_dim`: the negative variational bound L = L_T + sum_{t>=1} L_{t-1} + L_0
    per test image, in bits per dimension, with the discretised Gaussian decoder.
    Timesteps are 0-based as everywhere in this package: index t here is Ho et al.'s t + 1,
    so index 0 is the decoder term -log p(x_0 | x_1), index t >= 1 is
    KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1})) (their L_t), and the prior term
    L_T = KL(q(x_T | x_0) || N(0, I)) uses alpha_bar at index T-1.

Every random function takes an explicit key or seed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax.data import to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.sampling import SIGMAS, EpsFn, sample_keys
from ddpm_jax.schedule import Schedule, posterior_mean, predict_x0, q_sample, reverse_mean
from ddpm_jax.training import epoch_permutation

# --------------------------------------------------------------------------- classifier

ARCHITECTURE = "cnn"
ARCH_VERSION = 2  # bump when Classifier changes in a way that old checkpoints cannot load into
INFO_FILE = "classifier.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """What defines a classifier and its training. The defaults reach >= 90 % test accuracy on
    Fashion-MNIST and >= 99 % on MNIST; anything smaller is for tests only."""

    channels: tuple[int, ...] = (32, 64)  # conv widths, each stage conv3x3 + ReLU + 2x2 max-pool
    features: int = 128  # width of the penultimate (feature) layer
    dropout: float = 0.3  # on the features, training only
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3  # Adam, cosine-decayed to 0 over the run
    seed: int = 0
    train_images: int = 0  # use the first N training images (0 = all)

    def architecture(self) -> dict:
        """The fields a checkpoint needs to rebuild the network (stored in classifier.json)."""
        return {"architecture": ARCHITECTURE, "arch_version": ARCH_VERSION, "channels": list(self.channels),
                "features": self.features, "dropout": self.dropout}


class Classifier(nn.Module):
    """Small CNN: [conv3x3(c) + ReLU + maxpool2x2] per c in channels, flatten,
    dense(features) (the feature layer), ReLU, dropout, dense(num_classes).

    Input (B, H, W, C) float32 in [-1, 1]; returns (logits (B, num_classes), features (B, features)).
    The features are taken before the ReLU: after it, units that never fire (a third or more
    of them in practice) would be constant 0 and make every feature covariance singular.
    """

    channels: tuple[int, ...] = (32, 64)
    features: int = 128
    num_classes: int = 10
    dropout: float = 0.3

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for width in self.channels:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        features = nn.Dense(self.features)(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(features))
        return nn.Dense(self.num_classes)(h), features


def create_classifier(config: ClassifierConfig, num_classes: int = 10) -> Classifier:
    return Classifier(channels=tuple(config.channels), features=config.features, num_classes=num_classes,
                      dropout=config.dropout)


def init_classifier(model: Classifier, key: jax.Array, image_shape: tuple[int, int, int]) -> dict:
    """Fresh variables {'params': ...} for images of shape (H, W, C)."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))


def classifier_loss(model: Classifier, params, images_u8, labels, key) -> jnp.ndarray:
    """Mean softmax cross-entropy (nats) of a batch; dropout on, drawn from key.
    images_u8: (B, H, W, C) uint8; labels: (B,) int."""
    logits, _ = model.apply(params, to_model_range(images_u8), train=True, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _check_images(images, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{what} must be uint8 NHWC (N, H, W, C), got {images.dtype} {images.shape}")
    return images


def train_classifier(images_u8, labels, config: ClassifierConfig = ClassifierConfig(), *, num_classes: int = 10,
                     progress: bool = False) -> tuple[Classifier, dict, list[float]]:
    """Trains a Classifier from scratch on (images (N, H, W, C) uint8, labels (N,) int).

    Each epoch runs N // batch_size full batches of permutation(fold_in(data_key, epoch));
    step s draws its dropout noise from fold_in(dropout_key, s). The same config and data
    give the same params on the same device. Returns (model, params {'params': ...},
    mean training loss of each epoch).
    """
    images_u8 = _check_images(images_u8)
    labels = np.asarray(labels, np.int32)
    if config.train_images:
        images_u8, labels = images_u8[:config.train_images], labels[:config.train_images]
    n = images_u8.shape[0]
    batch = min(config.batch_size, n)
    if n < 1 or config.epochs < 1:
        raise UserError(f"need at least one training image and one epoch, got {n} images, {config.epochs} epochs")
    steps_per_epoch = n // batch
    model = create_classifier(config, num_classes)
    key = jax.random.key(config.seed)
    init_key, data_key, dropout_key = (jax.random.fold_in(key, i) for i in range(3))
    params = init_classifier(model, init_key, images_u8.shape[1:])
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch))
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels, order, index, step_number):
        picked = jax.lax.dynamic_slice_in_dim(order, index * batch, batch)
        loss, grads = jax.value_and_grad(lambda p: classifier_loss(
            model, p, images[picked], labels[picked], jax.random.fold_in(dropout_key, step_number)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    from tqdm.auto import tqdm

    images_dev, labels_dev = jax.device_put(images_u8), jax.device_put(labels)
    epoch_losses = []
    with tqdm(total=config.epochs * steps_per_epoch, desc="Training classifier", unit="step",
              disable=not progress, leave=False) as bar:
        for epoch in range(config.epochs):
            order = epoch_permutation(data_key, epoch, n)
            losses = []
            for i in range(steps_per_epoch):
                params, opt_state, loss = step(params, opt_state, images_dev, labels_dev, order, i,
                                               epoch * steps_per_epoch + i)
                losses.append(loss)
                bar.update(1)
            epoch_losses.append(float(np.mean(jax.device_get(losses))))
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
    return model, params, epoch_losses


@functools.partial(jax.jit, static_argnames=("model",))
def _classify_batch(model: Classifier, params, images_u8):
    return model.apply(params, to_model_range(images_u8))


def classifier_outputs(model: Classifier, params, images_u8, *, batch_size: int = 500,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float32, logits (N, num_classes) float32) of uint8 images (N, H, W, C),
    batch_size at a time (the last batch padded, so one compiled shape)."""
    images_u8 = _check_images(images_u8)
    n = images_u8.shape[0]
    batch = max(1, min(batch_size, n))
    features, logits = [], []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, batch), desc="Classifying", unit="batch", disable=not progress, leave=False):
        chunk = images_u8[start:start + batch]
        count = chunk.shape[0]
        if count < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - count, *chunk.shape[1:]), np.uint8)])
        out_logits, out_features = _classify_batch(model, params, chunk)
        features.append(np.asarray(out_features[:count]))
        logits.append(np.asarray(out_logits[:count]))
    if not features:
        return np.zeros((0, model.features), np.float32), np.zeros((0, model.num_classes), np.float32)
    return np.concatenate(features), np.concatenate(logits)


def accuracy(logits, labels) -> float:
    """Fraction of rows of logits (N, K) whose argmax equals labels (N,)."""
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)))


# --------------------------------------------------------------------------- classifier cache


def cache_root(cache_dir: str = "") -> str:
    """cache_dir, else $DDPM_JAX_CACHE, else ~/.cache/ddpm_jax (absolute)."""
    root = cache_dir or os.environ.get("DDPM_JAX_CACHE", "") or os.path.join("~", ".cache", "ddpm_jax")
    return os.path.abspath(os.path.expanduser(root))


def classifier_dir(dataset: str, cache_dir: str = "") -> str:
    """Where the classifier of `dataset` lives: <cache root>/classifiers/<dataset>."""
    return os.path.join(cache_root(cache_dir), "classifiers", dataset)


def has_classifier(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, INFO_FILE)) and os.path.isdir(os.path.join(folder, PARAMS_DIR))


def save_classifier(folder: str, params, info: dict, *, overwrite: bool = False) -> None:
    """Writes params (Orbax StandardCheckpointer) and info (JSON, which must hold
    ClassifierConfig.architecture()'s fields) to folder. The new classifier is assembled in a
    sibling temp folder and swapped in, so a failed save leaves any old one intact."""
    import orbax.checkpoint as ocp

    import ddpm_jax.checkpoint  # noqa: F401  (hides Orbax's INFO/WARNING chatter)

    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not overwrite:
        raise UserError(f"{folder} exists; pass --overwrite to replace the classifier stored there")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, PARAMS_DIR), jax.device_get(params))
        checkpointer.wait_until_finished()
    with open(os.path.join(staging, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    old = f"{folder}.old-{os.getpid()}"
    if os.path.exists(folder):
        os.rename(folder, old)
    os.rename(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_classifier_info(folder: str) -> dict:
    """classifier.json of a stored classifier; UserError when missing or unreadable."""
    path = os.path.join(folder, INFO_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no classifier in {folder}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); retrain the classifier with --train-classifier "
                        "--overwrite") from None
    if info.get("architecture") != ARCHITECTURE or info.get("arch_version") != ARCH_VERSION:
        raise UserError(f"the classifier in {folder} is {info.get('architecture')} v{info.get('arch_version')}, this "
                        f"code needs {ARCHITECTURE} v{ARCH_VERSION}; retrain it with --train-classifier --overwrite")
    return info


def load_classifier(folder: str) -> tuple[Classifier, dict, dict]:
    """(model, params {'params': ...}, info) of the classifier stored in folder."""
    import orbax.checkpoint as ocp

    import ddpm_jax.checkpoint  # noqa: F401

    folder = os.path.abspath(folder)
    info = read_classifier_info(folder)
    config = ClassifierConfig(channels=tuple(info["channels"]), features=int(info["features"]),
                              dropout=float(info["dropout"]))
    model = create_classifier(config, int(info["num_classes"]))
    target = jax.eval_shape(lambda: init_classifier(model, jax.random.key(0), tuple(info["image_shape"])))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(os.path.join(folder, PARAMS_DIR), target)
    except Exception as e:  # Orbax raises assorted types for missing/corrupt/mismatched files
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot restore the classifier in {folder} ({type(e).__name__}: {first_line}); "
                        "retrain it with --train-classifier --overwrite") from None
    return model, params, info


# --------------------------------------------------------------------------- FID


def _check_features(features, what: str = "features", min_rows: int = 2) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise UserError(f"{what} must be a 2-D array (N, d), got shape {features.shape}")
    if features.shape[0] < min_rows:
        raise UserError(f"{what}: need at least {min_rows} rows, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise UserError(f"{what} contain NaN or inf")
    return features


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) (unbiased, N - 1) of features (N, d), N >= 2, in float64."""
    features = _check_features(features)
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2, method: str = "auto") -> float:
    """tr((sigma1 sigma2)^(1/2)) for PSD covariances (d, d), in float64.

    'sqrtm': scipy.linalg.sqrtm of the product, as pytorch-fid (with its 1e-6 diagonal
    offset when the result is not finite, and the real part); a product scipy reports as
    singular (fewer rows than dimensions, constant features) goes to 'eigh'. 'eigh': the product's
    eigenvalues are those of the symmetric PSD sqrt(s1) s2 sqrt(s1), so the trace is the sum
    of the square roots of that matrix's eigenvalues (clipped at 0): no complex round-off.
    'auto' = 'sqrtm' when scipy is installed, else 'eigh'.
    """
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401

            method = "sqrtm"
        except ImportError:
            method = "eigh"
    if method == "eigh":
        root1 = _psd_sqrt(s1)
        inner = root1 @ s2 @ root1
        return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None))))
    if method == "sqrtm":
        import warnings

        import scipy.linalg

        with warnings.catch_warnings():
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            try:
                covmean = scipy.linalg.sqrtm(s1 @ s2)
            except scipy.linalg.LinAlgWarning:  # a singular product: eigh handles it exactly
                return trace_sqrt_product(s1, s2, "eigh")
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        return float(np.real(np.trace(covmean)))
    raise ValueError(f"unknown method {method!r}: use 'auto', 'sqrtm' or 'eigh'")


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "auto") -> float:
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)): the squared
    2-Wasserstein distance of N(mu1, sigma1) and N(mu2, sigma2). Clipped at 0 (round-off)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched shapes: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2, method)
    return float(max(value, 0.0))


def fid(features_a, features_b, method: str = "auto") -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N_a, d), (N_b, d), N >= 2."""
    a = _check_features(features_a, "first feature set")
    b = _check_features(features_b, "second feature set")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"feature sets of different widths: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b), method=method)


# --------------------------------------------------------------------------- KID


def polynomial_kernel(x, y) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for rows of x (n, d) and y (m, d): (n, m)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased estimate of MMD^2 between the distributions of x (n, d) and y (m, d), n, m >= 2,
    with the cubic polynomial kernel: within-set means exclude the diagonal."""
    n, m = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(features_a, features_b, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) of feature sets (N_a, d), (N_b, d):
    mmd2_unbiased on num_subsets pairs of random subsets of m = min(subset_size, N_a, N_b)
    rows each, drawn without replacement (numpy default_rng(seed)). Returns (mean, std over
    subsets). Unbiased: about 0 for two samples of one distribution (it can be negative)."""
    a = _check_features(features_a, "first feature set")
    b = _check_features(features_b, "second feature set")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"feature sets of different widths: {a.shape[1]} and {b.shape[1]}")
    if num_subsets < 1:
        raise UserError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UserError(f"KID needs subsets of at least 2 rows, got subset_size={subset_size}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------- class histogram


def class_histogram(logits, num_classes: int | None = None) -> np.ndarray:
    """Counts (num_classes,) int of the argmax class of each row of logits (N, K)."""
    logits = np.asarray(logits)
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    return np.bincount(np.argmax(logits, axis=-1), minlength=num_classes)


def entropy_nats(counts) -> float:
    """Shannon entropy in nats of the distribution counts / counts.sum() (counts >= 0, any scale;
    empty bins contribute 0). 0 for one class, ln K for K equally filled classes."""
    p = np.asarray(counts, np.float64).ravel()
    if p.size == 0 or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive sum")
    p = p / p.sum()
    nonzero = p[p > 0]
    return float(max(-np.sum(nonzero * np.log(nonzero)), 0.0))


def compare_features(features, logits, reference_features, *, class_names=None, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID and KID of features (N, d) against reference_features (M, d), and the class
    histogram (fractions) + entropy (nats) of logits (N, K). A JSON-ready dict."""
    counts = class_histogram(logits)
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(counts))]
    kid_mean, kid_std = kid(features, reference_features, num_subsets=kid_subsets, subset_size=kid_subset_size,
                            seed=seed)
    return {
        "num": int(len(features)),
        "fid": fid(features, reference_features),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": int(min(kid_subset_size, len(features), len(reference_features))),
        "class_histogram": {name: float(c / counts.sum()) for name, c in zip(names, counts)},
        "class_entropy_nats": entropy_nats(counts),
    }


# --------------------------------------------------------------------------- bits/dim

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


def _vlb_term(eps_fn: EpsFn, params, schedule: Schedule, x0, keys, t, *, sigma: str, clip_x0: bool):
    """The bound's term at 0-based step t for each image, nats, (B,): the decoder's -log
    p(x0 | x_1) at t = 0, else KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); x_t = q_sample
    with noise normal(fold_in(keys[i], t))."""
    batch = x0.shape[0]
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x0.shape[1:], x0.dtype))(keys)
    t_batch = jnp.full((batch,), t, jnp.int32)
    x_t = q_sample(schedule, x0, t_batch, noise)
    eps = eps_fn(params, x_t, t_batch)
    if clip_x0:
        mean = posterior_mean(schedule, jnp.clip(predict_x0(schedule, x_t, t_batch, eps), -1.0, 1.0), x_t, t_batch)
    else:
        mean = reverse_mean(schedule, x_t, t_batch, eps)
    log_var = model_log_variances(schedule, sigma)[t]
    kl = normal_kl(posterior_mean(schedule, x0, x_t, t_batch), posterior_log_variances(schedule)[t], mean, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    per_dim = jnp.where(t == 0, nll, kl)
    return per_dim.reshape(batch, -1).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("eps_fn", "sigma", "clip_x0"))
def vlb_terms(eps_fn: EpsFn, params, schedule: Schedule, x0: jnp.ndarray, keys: jax.Array, *,
              sigma: str = "beta", clip_x0: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Every term of the variational bound for each image, in nats.

    x0: (B, H, W, C) float32 on the 256-level grid of [-1, 1] (to_model_range of uint8);
    keys: (B,) one key per image (term t uses fold_in(keys[i], t)). T model evaluations of
    batch B, one per step, in a lax.map. Returns (terms (B, T): index 0 the decoder NLL L_0,
    index t >= 1 the KL L_t; prior (B,): L_T). The negative bound is terms.sum(1) + prior.
    """
    per_step = jax.lax.map(
        lambda t: _vlb_term(eps_fn, params, schedule, x0, keys, t, sigma=sigma, clip_x0=clip_x0),
        jnp.arange(schedule.n_steps))
    return per_step.T, prior_kl(schedule, x0)


class BitsPerDim(NamedTuple):
    """Result of bits_per_dim: every value in bits per dimension (nats / (D ln 2), D = H W C)."""

    per_image: np.ndarray  # (N,) the negative bound of each image
    mean: float  # per_image.mean()
    terms: np.ndarray  # (T,) mean over images of each step's term (index 0 the decoder)
    prior: float  # mean of L_T


def bits_per_dim(eps_fn: EpsFn, params, schedule: Schedule, images_u8, *, key: jax.Array, sigma: str = "beta",
                 clip_x0: bool = False, batch_size: int = 64, progress: bool = False) -> BitsPerDim:
    """Negative variational bound of uint8 images (N, H, W, C), in bits/dim (Ho et al. eq. 5, 13).

    eps_fn(params, x, t) predicts the noise (for flax: model.apply with params = {'params': ...});
    the reverse variance is beta_t ('beta') or the posterior variance ('beta_tilde');
    clip_x0 computes the model's mean from the x0 estimate clipped to [-1, 1]. Image i
    uses the key fold_in(key, i), so the values do not depend on batch_size. Costs T model
    evaluations per image, batch_size images at a time (the last batch padded).
    """
    images_u8 = _check_images(images_u8)
    if sigma not in SIGMAS:
        raise UserError(f"unknown sigma {sigma!r}: use 'beta' or 'beta_tilde'")
    n = images_u8.shape[0]
    if n < 1 or batch_size < 1:
        raise UserError(f"need at least one image and batch_size >= 1, got {n} images, batch_size={batch_size}")
    batch = min(batch_size, n)
    from tqdm.auto import tqdm

    terms, priors = [], []
    with tqdm(total=n, desc="Bits/dim", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch):
            chunk = images_u8[start:start + batch]
            count = chunk.shape[0]
            if count < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - count, axis=0)])
            t_terms, prior = vlb_terms(eps_fn, params, schedule, to_model_range(chunk), sample_keys(key, start, batch),
                                       sigma=sigma, clip_x0=clip_x0)
            terms.append(np.asarray(t_terms[:count], np.float64))
            priors.append(np.asarray(prior[:count], np.float64))
            bar.update(count)
    terms, priors = np.concatenate(terms), np.concatenate(priors)
    scale = 1.0 / (math.prod(images_u8.shape[1:]) * math.log(2.0))
    per_image = (terms.sum(axis=1) + priors) * scale
    return BitsPerDim(per_image=per_image, mean=float(per_image.mean()), terms=terms.mean(axis=0) * scale,
                      prior=float(priors.mean() * scale))


# --------------------------------------------------------------------------- classifier training record


def classifier_info(config: ClassifierConfig, *, dataset: str, image_shape, num_classes: int, test_accuracy: float,
                    train_images: int, train_seconds: float, epoch_losses: list[float]) -> dict:
    """The JSON stored beside a classifier's params: architecture, training and accuracy."""
    return {
        **config.architecture(),
        "dataset": dataset,
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "test_accuracy": test_accuracy,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "train_images": train_images,
        "train_seconds": round(train_seconds, 1),
        "epoch_losses": epoch_losses,
        "device": jax.devices()[0].platform,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
