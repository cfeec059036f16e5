"""configs/fashion_unet.py's U-Net, conditioned on the 10 Fashion-MNIST classes.

Trained with label dropout (config.train.label_dropout), so it can sample with
classifier-free guidance, e.g. `--config.sample.guidance=2`.
(Config files are loaded by path, so each one stands alone rather than importing another.)
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
    config.model.num_classes = 10
    config.train.ema_decay = 0.999
    return config
