"""The residual/attention U-Net on Fashion-MNIST: `python train.py --config configs/fashion_unet.py`.

Sized for a CPU: channels 16 at 28x28, 32 at 14x14, 64 at 7x7 (attention at 7x7),
2 res blocks per level, 989,217 parameters; a training step (batch 128) costs about
2.5-3.5x the article model's on a small CPU.
"""

from ddpm_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "fashion_mnist"
    config.model.name = "unet"
    config.model.channels = 16
    config.model.channel_mults = (1, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (7,)
    config.model.num_groups = 8
    config.model.dropout = 0.1
    config.train.ema_decay = 0.999
    return config
