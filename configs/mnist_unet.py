"""The residual/attention U-Net on MNIST: `python train.py --config configs/mnist_unet.py`.

The same model as configs/fashion_unet.py (see ddpm_jax.config.unet_config), on MNIST.
"""

from ddpm_jax.config import unet_config


def get_config():
    return unet_config("mnist")
