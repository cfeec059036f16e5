"""A tiny, fast config for smoke runs and tests: few diffusion steps, small batch, and a
small U-Net (two levels, one block each, no attention) that compiles in a fraction of the
article's U-Net's time (compiles dominate a test run)."""

from ddpm_jax.config import base_config


def get_config():
    config = base_config()
    config.model.name = "unet"
    config.model.channels = 8
    config.model.channel_mults = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = ()
    config.model.num_groups = 4
    config.diffusion.n_steps = 50
    config.train.batch_size = 8
    config.train.num_epochs = 1
    config.train.steps_per_chunk = 4
    config.train.checkpoint_every_steps = 8
    config.train.progress = False
    config.sample.num = 4
    return config
