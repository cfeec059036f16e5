"""configs/fashion_unet.py's U-Net, conditioned on the 10 Fashion-MNIST classes.

Trained with label dropout (config.train.label_dropout), so it can sample with
classifier-free guidance, e.g. `--config.sample.guidance=2`.
"""

from ddpm_jax.config import unet_config


def get_config():
    return unet_config("fashion_mnist", num_classes=10)
