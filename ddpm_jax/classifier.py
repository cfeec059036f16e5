"""The domain classifier whose features the sample-quality metrics use, and its cache.

:class:`Classifier`, a small CNN (flax.linen) trained per dataset by :func:`train_classifier`
(optax Adam, one jitted step, ``fold_in(key, step)`` for the dropout noise and the flips,
``permutation(fold_in(data_key, epoch))`` for the data order), sized for the dataset's images
by :func:`classifier_config_for` (MNIST-like 28x28 grayscale: two stages, 128 features;
CIFAR-10-like 32x32 RGB: three wider stages, 256 features, flips). Its penultimate layer
(``features``, before the ReLU) is the feature space of ddpm_jax.metrics; its logits
give the class histogram. Stored in a cache folder (:func:`classifier_dir`,
:func:`save_classifier`, :func:`load_classifier`): an Orbax checkpoint of the params plus
``classifier.json`` (:func:`classifier_info`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax.batching import batched
from ddpm_jax.data import to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.metrics import check_images
from ddpm_jax.training import epoch_permutation, random_flip

ARCHITECTURE = "cnn"
ARCH_VERSION = 2  # bump when Classifier changes in a way that old checkpoints cannot load into
INFO_FILE = "classifier.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """What defines a classifier and its training. The defaults, the MNIST-like images' (see
    classifier_config_for), reach >= 90 % test accuracy on Fashion-MNIST and >= 99 % on MNIST;
    anything smaller is for tests only."""

    channels: tuple[int, ...] = (32, 64)  # conv widths, each stage conv3x3 + ReLU + 2x2 max-pool
    features: int = 128  # width of the penultimate (feature) layer
    dropout: float = 0.3  # on the features, training only
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3  # Adam, cosine-decayed to 0 over the run
    seed: int = 0
    train_images: int = 0  # use the first N training images (0 = all)
    random_flip: bool = False  # mirror each training image left-right with probability 1/2

    def architecture(self) -> dict:
        """The fields a checkpoint needs to rebuild the network (stored in classifier.json)."""
        return {"architecture": ARCHITECTURE, "arch_version": ARCH_VERSION, "channels": list(self.channels),
                "features": self.features, "dropout": self.dropout}


def classifier_config_for(image_shape: tuple[int, int, int]) -> ClassifierConfig:
    """The classifier suited to images of shape (H, W, C).

    Grayscale up to 28x28 (MNIST, Fashion-MNIST): ClassifierConfig()'s two stages (32, 64) and 128
    features, 5 epochs, unchanged since its cached checkpoints were trained. Anything else, such
    as CIFAR-10's 32x32x3: stages of 64, 128, 256, 256, ... channels until the map is 4 to 7
    pixels wide (three at 32x32), 256 features, 10 epochs, and left-right flips for RGB images
    (photos are mirror-symmetric in distribution; digits and letters are not).
    """
    height, width, channels = image_shape
    if channels == 1 and max(height, width) <= 28:
        return ClassifierConfig()
    stages = max(1, min(height, width).bit_length() - 3)
    return ClassifierConfig(channels=tuple(min(64 << i, 256) for i in range(stages)), features=256, epochs=10,
                            random_flip=channels == 3)


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


def train_classifier(images_u8, labels, config: ClassifierConfig = ClassifierConfig(), *, num_classes: int = 10,
                     progress: bool = False) -> tuple[Classifier, dict, list[float]]:
    """Trains a Classifier from scratch on (images (N, H, W, C) uint8, labels (N,) int).

    Each epoch runs N // batch_size full batches of permutation(fold_in(data_key, epoch));
    step s draws its dropout noise from fold_in(dropout_key, s) and, with config.random_flip,
    its flips from fold_in(flip_key, s). The same config and data
    give the same params on the same device. Returns (model, params {'params': ...},
    mean training loss of each epoch).
    """
    images_u8 = check_images(images_u8)
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
    init_key, data_key, dropout_key, flip_key = (jax.random.fold_in(key, i) for i in range(4))
    params = init_classifier(model, init_key, images_u8.shape[1:])
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch))
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels, order, index, step_number):
        picked = jax.lax.dynamic_slice_in_dim(order, index * batch, batch)
        batch_images = images[picked]
        if config.random_flip:
            batch_images = random_flip(batch_images, jax.random.fold_in(flip_key, step_number))
        loss, grads = jax.value_and_grad(lambda p: classifier_loss(
            model, p, batch_images, labels[picked], jax.random.fold_in(dropout_key, step_number)))(params)
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
    batch_size at a time (batching.batched: one compiled shape)."""
    images_u8 = check_images(images_u8)
    n = images_u8.shape[0]
    if n == 0:
        return np.zeros((0, model.features), np.float32), np.zeros((0, model.num_classes), np.float32)
    from tqdm.auto import tqdm

    with tqdm(total=n, desc="Classifying", unit="img", disable=not progress, leave=False) as bar:
        logits, features = batched(lambda indices: _classify_batch(model, params, images_u8[indices]), n,
                                   max(1, min(batch_size, n)), on_batch=lambda end, rows: bar.update(len(rows[0])))
    return features, logits


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
        raise UserError(f"cannot read {path} ({e}); retrain the classifier with --train_classifier "
                        "--overwrite") from None
    if info.get("architecture") != ARCHITECTURE or info.get("arch_version") != ARCH_VERSION:
        raise UserError(f"the classifier in {folder} is {info.get('architecture')} v{info.get('arch_version')}, this "
                        f"code needs {ARCHITECTURE} v{ARCH_VERSION}; retrain it with --train_classifier --overwrite")
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
                        "retrain it with --train_classifier --overwrite") from None
    return model, params, info


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
        "random_flip": config.random_flip,
        "seed": config.seed,
        "train_images": train_images,
        "train_seconds": round(train_seconds, 1),
        "epoch_losses": epoch_losses,
        "device": jax.devices()[0].platform,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
