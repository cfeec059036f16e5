"""Noise-prediction networks eps_theta(x_t, t), chosen by `config.model.name`."""

from __future__ import annotations

import flax.linen as nn

from ddpm_jax.errors import UserError
from ddpm_jax.models.article_unet import ArticleUNet, article_sinusoidal_table

MODEL_NAMES = ("article_unet",)


def create_model(config, image_shape: tuple[int, int, int]) -> nn.Module:
    """The network `config.model.name` names, checked against the data's (H, W, C)."""
    name = config.model.name
    if name == "article_unet":
        if tuple(image_shape[:2]) != (28, 28):
            raise UserError(f"model 'article_unet' is built for 28x28 images, the data has {image_shape[0]}x{image_shape[1]}")
        return ArticleUNet(n_steps=config.diffusion.n_steps, time_emb_dim=config.model.time_emb_dim)
    raise UserError(f"unknown model.name {name!r}: choose one of {', '.join(MODEL_NAMES)}")


__all__ = ["ArticleUNet", "article_sinusoidal_table", "create_model", "MODEL_NAMES"]
