"""Noise-prediction networks eps_theta(x_t, t[, y]), chosen by `config.model.name`.

Every model is called as `model.apply({'params': p}, x, t, y=None, train=False,
rngs={'dropout': key})`: x (B, H, W, C) float32, t (B,) int in [0, n_steps),
y (B,) int class labels (conditional models only; label num_classes = none).
Parameters and outputs are float32 whatever `config.model.dtype` (the computation's).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.errors import UserError
from ddpm_jax.models.article_unet import ArticleUNet, article_sinusoidal_table

MODEL_NAMES = ("article_unet", "article_unet_fixed", "unet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
    """The jnp dtype `config.model.dtype` names ('float32' or 'bfloat16'); one-line UserError otherwise."""
    name = config.model.get("dtype", "float32")
    if name not in DTYPES:
        raise UserError(f"--config.model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name != "float32" and config.model.name != "unet":
        # The article's models are tiny and checked against PyTorch in float32; bf16 would buy them nothing.
        raise UserError(f"--config.model.dtype={name} is supported only by --config.model.name=unet")
    return DTYPES[name]


def create_model(config, image_shape: tuple[int, int, int]) -> nn.Module:
    """The network `config.model.name` names, checked against the data's (H, W, C)."""
    m = config.model
    name = m.name
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model.name {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    dtype = compute_dtype(config)
    if name in ("article_unet", "article_unet_fixed"):
        if tuple(image_shape[:2]) != (28, 28):
            raise UserError(f"model {name!r} is built for 28x28 images, the data has {image_shape[0]}x{image_shape[1]}")
        if m.num_classes:
            raise UserError(f"model {name!r} is unconditional; set --config.model.num_classes=0 "
                            "or use --config.model.name=unet for class-conditional training")
        return ArticleUNet(n_steps=config.diffusion.n_steps, time_emb_dim=m.time_emb_dim,
                           normalize_input=name == "article_unet")
    from ddpm_jax.models.unet import UNet

    return UNet(channels=m.channels, channel_mults=tuple(m.channel_mults), num_res_blocks=m.num_res_blocks,
                attention_resolutions=tuple(m.attention_resolutions), dropout=m.dropout,
                num_groups=m.num_groups, num_classes=m.num_classes, image_size=int(image_shape[0]),
                patch_size=m.get("patch_size", 1), downsample_padding=m.get("downsample_padding", "symmetric"),
                dtype=dtype)


__all__ = ["DTYPES", "MODEL_NAMES", "ArticleUNet", "article_sinusoidal_table", "compute_dtype", "create_model"]
