"""Sampling throughput: the whole reverse process (all its steps in one lax.fori_loop) for a batch.

    python benchmarks/sample_throughput.py --config configs/fashion.py [--num 100] [--repeats 2] [--json out.json]
    python benchmarks/sample_throughput.py --config configs/fashion.py --config.sample.sampler=ddim --config.sample.steps=50

Parameters are freshly initialised (speed does not depend on their values).
images/s = num / median seconds of one full sampling call after compilation.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import compile_seconds, device_info, median, peak_rss_mib, report, timed  # noqa: E402
from ddpm_jax import runtime  # noqa: E402
from ddpm_jax.generate import sample_options  # noqa: E402
from ddpm_jax.models import create_model  # noqa: E402
from ddpm_jax.sampling import sample, sample_keys  # noqa: E402
from ddpm_jax.schedule import make_schedule  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/fashion.py", "Config file.", lock_config=True)
flags.DEFINE_integer("num", 100, "Samples drawn together (one batch).")
flags.DEFINE_integer("repeats", 2, "Timed sampling calls after the compiling one.")
flags.DEFINE_string("json", "", "Also write the result to this file.")
FLAGS = flags.FLAGS


def main(_):
    runtime.configure(reexec=True)  # the CLIs' process settings (DDPM_JAX_CPU_TUNING=off: without them)
    config = FLAGS.config
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ddpm-jax-bench-cache-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    image_shape = (28, 28, 1)
    model = create_model(config, image_shape)
    schedule = make_schedule(config.diffusion)
    num_classes = config.model.num_classes
    labels = jnp.arange(FLAGS.num) % num_classes if num_classes else None
    variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), jnp.zeros((1,), jnp.int32),
                           None if labels is None else labels[:1])
    options = sample_options(config, guidance=0.0 if labels is None else None)  # no labels: nothing to guide

    def draw(seed):
        keys = sample_keys(jax.random.key(seed), 0, FLAGS.num)
        return sample(model.apply, variables, schedule, keys, image_shape, options, labels=labels,
                      prediction=config.diffusion.prediction)[0]

    before = compile_seconds()
    timed(lambda: draw(0))  # compiles
    compile_s = compile_seconds() - before
    times = [timed(lambda: draw(i + 1))[1] for i in range(FLAGS.repeats)]
    seconds = median(times)
    report({
        "benchmark": "sample_throughput",
        "model": config.model.name,
        "num_samples": FLAGS.num,
        "n_steps": schedule.n_steps,
        "sampler": options.sampler,
        "steps": options.steps or schedule.n_steps,
        "guidance": options.guidance,
        "images_per_s": round(FLAGS.num / seconds, 3),
        "seconds_median": round(seconds, 2),
        "seconds_all": [round(t, 2) for t in times],
        "compile_s_cold": round(compile_s, 2),  # tracing, lowering and compiling (JAX's events)
        "peak_rss_mib": round(peak_rss_mib(), 1),
        **device_info(),
    }, FLAGS.json)


if __name__ == "__main__":
    app.run(main)
