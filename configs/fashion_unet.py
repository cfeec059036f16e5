"""The residual/attention U-Net on Fashion-MNIST: `python train.py --config configs/fashion_unet.py`.

Sized for a CPU (see ddpm_jax.config.unet_config): 989,217 parameters; a training step
(batch 128) costs about 2.5-3.5x the article model's on a small CPU.
"""

from ddpm_jax.config import unet_config


def get_config():
    return unet_config("fashion_mnist")
