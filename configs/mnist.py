"""The article's run on MNIST: `python train.py --config configs/mnist.py`."""

from ddpm_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist"
    return config
