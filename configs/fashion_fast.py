"""Quality per CPU minute on Fashion-MNIST: `python train.py --config configs/fashion_fast.py`.

A class-conditional U-Net on 2x2 patches, v-prediction with min-SNR weighting, trained for at
most 55 minutes, sampled with DPM-Solver++(2M) in 15 network evaluations (see
ddpm_jax.config.fast_config and the README's Results).
"""

from ddpm_jax.config import fast_config


def get_config():
    return fast_config("fashion_mnist")
