"""The article's run on Fashion-MNIST: `python train.py --config configs/fashion.py`."""

from ddpm_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "fashion_mnist"
    return config
