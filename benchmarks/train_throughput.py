"""Training throughput of a config's model: images/s, compile time cold and warm, peak RSS.

    python benchmarks/train_throughput.py --config configs/fashion.py [--steps 30] [--json out.json]
    python benchmarks/train_throughput.py --config configs/fashion.py --config.train.batch_size=256
    python benchmarks/train_throughput.py --config configs/cifar10.py --config.model.dtype=bfloat16 --num_examples 50000

The data is random uint8 of the dataset's shape (throughput does not depend on
the pixels; data.image_size and data.channels override it), kept on the device as in
training; steps run as `train_chunk` does in a real run (compiled first, then the
compiler's memory released), random flips included when the config has them. images/s
comes from the median chunk time over at least 3 chunks and 30 steps.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import device_info, median, peak_rss_mib, report, timed  # noqa: E402
from ddpm_jax import runtime  # noqa: E402
from ddpm_jax.models import create_model  # noqa: E402
from ddpm_jax.schedule import make_schedule  # noqa: E402
from ddpm_jax.training import (compile_train_chunk, create_optimizer, create_train_state,  # noqa: E402
                               epoch_permutation, run_keys, scan_by_default, train_chunk)

config_flags.DEFINE_config_file("config", "configs/fashion.py", "Config file.", lock_config=True)
flags.DEFINE_integer("steps", 30, "Timed training steps (at least 30, and at least 3 chunks, for the median).")
flags.DEFINE_integer("warmup", 1, "Untimed chunks after compilation.")
flags.DEFINE_integer("num_examples", 60000, "Size of the synthetic on-device training set.")
flags.DEFINE_string("json", "", "Also write the result to this file.")
FLAGS = flags.FLAGS

IMAGE_SHAPE = {"fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def image_shape_of(data_config) -> tuple[int, int, int]:
    """(H, W, C) of the config's training images, without reading them."""
    size, channels = data_config.get("image_size", 0), data_config.get("channels", 0)
    if data_config.name not in IMAGE_SHAPE and not (size and channels):
        raise SystemExit(f"no stored shape for {data_config.name!r}: pass --config.data.image_size and "
                         "--config.data.channels")
    height, width, stored = IMAGE_SHAPE.get(data_config.name, (size, size, channels))
    return (size or height, size or width, channels or stored)


def main(_):
    runtime.configure(reexec=True)  # the CLIs' process settings (DDPM_JAX_CPU_TUNING=off: without them)
    config = FLAGS.config
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ddpm-jax-bench-cache-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    image_shape = image_shape_of(config.data)
    batch, chunk = config.train.batch_size, config.train.steps_per_chunk
    model = create_model(config, image_shape)
    keys = run_keys(jax.random.key(config.seed))
    num_classes = config.model.num_classes
    d = config.diffusion
    steps_per_epoch = FLAGS.num_examples // batch
    # The learning-rate schedule of a real run on this many examples (it does not change the speed).
    optimizer = create_optimizer(config.optim, steps_per_epoch * config.train.num_epochs)
    state = create_train_state(model, make_schedule(d), optimizer, keys["init"],
                               image_shape, ema_decay=config.train.ema_decay, num_classes=num_classes,
                               label_dropout=config.train.label_dropout, prediction=d.prediction,
                               loss_weighting=d.loss_weighting, snr_gamma=d.snr_gamma,
                               random_flip=config.data.random_flip)
    runtime.release_free_host_memory()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (FLAGS.num_examples, *image_shape), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, num_classes, FLAGS.num_examples, dtype=np.int32)) if num_classes else None
    order = epoch_permutation(keys["data"], 0, FLAGS.num_examples)
    options = dict(num_steps=chunk, batch_size=batch, labels=labels)

    # As a training run does: compile the chunk, give the compiler's memory back, then step.
    _, cold = timed(lambda: compile_train_chunk(state, images, order, keys["train"], **options))
    jax.clear_caches()
    _, warm = timed(lambda: compile_train_chunk(state, images, order, keys["train"], **options))
    runtime.release_free_host_memory()
    position = 0

    def run_chunk():
        nonlocal state, position
        if position + chunk > steps_per_epoch:
            position = 0
        state, metrics = train_chunk(state, images, order, position, keys["train"], **options)
        position += chunk
        return metrics["loss"]

    for _ in range(FLAGS.warmup):
        timed(run_chunk)
    times = [timed(run_chunk)[1] for _ in range(max(3, -(-FLAGS.steps // chunk)))]
    per_chunk = median(times)
    report({
        "benchmark": "train_throughput",
        "model": config.model.name,
        "dtype": config.model.dtype,
        "image_shape": list(image_shape),
        "parameters": sum(x.size for x in jax.tree.leaves(state.params)),
        "batch_size": batch,
        "steps_per_chunk": chunk,
        "scan": scan_by_default(),
        "timed_steps": len(times) * chunk,
        "images_per_s": round(chunk * batch / per_chunk, 1),
        "steps_per_s": round(chunk / per_chunk, 2),
        "step_ms_median": round(1000 * per_chunk / chunk, 2),
        "step_ms_per_chunk": [round(1000 * t / chunk, 1) for t in times],
        "compile_s_cold": round(cold, 2),
        "compile_s_warm": round(warm, 2),  # from the persistent compilation cache
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **device_info(),
    }, FLAGS.json)


if __name__ == "__main__":
    app.run(main)
