"""A tiny, fast config for smoke runs and tests: few diffusion steps, small batch."""

from ddpm_jax.config import base_config


def get_config():
    config = base_config()
    config.diffusion.n_steps = 50
    config.train.batch_size = 8
    config.train.num_epochs = 1
    config.train.steps_per_chunk = 4
    config.train.checkpoint_every_steps = 8
    config.train.progress = False
    config.sample.num = 4
    return config
