"""The residual/attention U-Net on MNIST: `python train.py --config configs/mnist_unet.py`.

The same model as configs/fashion_unet.py (989,217 parameters), on MNIST.
(Config files are loaded by path, so each one stands alone rather than importing another.)
"""

from ddpm_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist"
    config.model.name = "unet"
    config.model.channels = 16
    config.model.channel_mults = (1, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (7,)
    config.model.num_groups = 8
    config.model.dropout = 0.1
    config.train.ema_decay = 0.999
    return config
