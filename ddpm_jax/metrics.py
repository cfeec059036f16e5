"""Sample-quality measures on feature vectors (pure NumPy, float64; features (N, d)).

:func:`fid` (Fréchet distance of Gaussian fits), :func:`kid` (unbiased MMD^2 with the cubic
polynomial kernel over random subsets, Bińkowski et al. 2018), :func:`class_histogram` and
:func:`entropy_nats` (natural log: the maximum for 10 classes is ln 10 = 2.303),
:func:`compare_features` (all of them at once). The features come from any network, e.g.
ddpm_jax.classifier's.
"""

from __future__ import annotations

import numpy as np

from ddpm_jax.errors import UserError


def check_images(images, what: str = "images") -> np.ndarray:
    """images as a numpy array; UserError unless uint8 NHWC (N, H, W, C)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{what} must be uint8 NHWC (N, H, W, C), got {images.dtype} {images.shape}")
    return images

# --------------------------------------------------------------------------- FID


def check_features(features, what: str = "features", min_rows: int = 2) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise UserError(f"{what} must be a 2-D array (N, d), got shape {features.shape}")
    if features.shape[0] < min_rows:
        raise UserError(f"{what}: need at least {min_rows} rows, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise UserError(f"{what} contain NaN or inf")
    return features


def _feature_pair(features_a, features_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = check_features(features_a, "first feature set"), check_features(features_b, "second feature set")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"feature sets of different widths: {a.shape[1]} and {b.shape[1]}")
    return a, b


def gaussian_fit(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) (unbiased, N - 1) of features (N, d), N >= 2, in float64."""
    features = check_features(features)
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
    a, b = _feature_pair(features_a, features_b)
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
    a, b = _feature_pair(features_a, features_b)
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


def total_variation(images) -> np.ndarray:
    """Mean absolute difference between neighbouring pixels of each uint8 image (N, H, W, C), in
    [0, 255]: (N,). Saturated salt-and-pepper images score far above any real image."""
    x = np.asarray(images, np.float64)
    return (np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))) / 2


def noise_like_share(images, reference_images, quantile: float = 0.995) -> float:
    """The share of images whose total variation exceeds the `quantile` of the reference images':
    noise-like samples (a real image is one with probability 1 - quantile)."""
    threshold = np.quantile(total_variation(reference_images), quantile)
    return float(np.mean(total_variation(images) > threshold))
