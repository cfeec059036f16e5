"""A configurable DDPM U-Net (Ho et al. 2020; Nichol & Dhariwal 2021 style), flax.linen, NHWC.

Levels at sizes S, S/2, ... (one per entry of channel_mults, width channels * mult),
each with num_res_blocks residual blocks [GroupNorm -> SiLU -> Conv3x3 -> + Dense(emb)
-> GroupNorm -> SiLU -> Dropout -> Conv3x3], self-attention at the sizes in
attention_resolutions, stride-2 conv down, nearest-neighbour + conv up, a
res / attn / res middle and skip connections after every block (as in Ho et al.).
Optional class conditioning: a learnt label embedding added to the time embedding.

Layer for layer Ho et al.'s `diffusion_tf/models/unet.py` (their CIFAR-10 model, channels 128,
mults (1, 2, 2, 2), attention at 16, is configs/cifar10.py: 35,746,307 parameters, their 35.7M),
but for two things that change no parameter: flax's default initialisers (theirs are
Glorot-uniform; the zero-initialised layers are the same) and, unless downsample_padding='same'
(TF's SAME, as theirs), stride-2 convs padded by one pixel on every side, whose windows sit one
pixel up and left of theirs.

dtype=jnp.bfloat16 computes activations, convolutions and matmuls in bfloat16, with float32
parameters, GroupNorm statistics and attention softmax, and returns float32.

With patch_size p > 1 the U-Net runs on (H/p, W/p, p*p*C) patches (space-to-depth in,
depth-to-space out): fewer, wider feature maps, which CPUs and GEMM units run far faster
than many narrow ones (see the README's "Fast configs").
"""

from __future__ import annotations

import functools
import math
from typing import Any

import einops
import jax.numpy as jnp
import flax.linen as nn

from ddpm_jax.errors import UserError
from ddpm_jax.models.convs import fast_conv

# nn.Conv (its parameters, names and init) with the sums in the forms XLA:CPU runs fast: stride
# 1 in the compiled CPU kernel, stride 2 at stride 1 (float32 on the CPU; lax's elsewhere).
Conv = functools.partial(nn.Conv, conv_general_dilated=fast_conv)

DOWNSAMPLE_PADDINGS = ("symmetric", "same")


def sinusoidal_embedding(t, dim: int):
    """Timestep embedding of Ho et al. (their `get_timestep_embedding`). t: (B,) -> (B, dim) float32.

    Columns [0, half) hold sin(t f_k), [half, 2 half) cos(t f_k), with
    f_k = 10000^(-k / (half - 1)), k = 0..half-1 (so f runs from 1 to exactly 1e-4);
    an odd dim gets a last column of zeros.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ResBlock(nn.Module):
    """(B, H, W, C_in), emb (B, E) -> (B, H, W, features)."""

    features: int
    num_groups: int
    dropout: float
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, emb, train: bool):
        dt = self.dtype
        h = Conv(self.features, (3, 3), dtype=dt)(nn.silu(nn.GroupNorm(self.num_groups, dtype=dt)(x)))
        h = h + nn.Dense(self.features, dtype=dt)(nn.silu(emb))[:, None, None, :]  # per-channel time/label shift
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(nn.GroupNorm(self.num_groups, dtype=dt)(h)))
        # Zero init: each block starts as the identity, which keeps deep stacks stable early on.
        h = Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros, dtype=dt)(h)
        if x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), name="skip", dtype=dt)(x)
        return x + h


def attention(query, key, value):
    """softmax(q k^T / sqrt(d)) v for q, k, v (B, L, heads, d) -> (B, L, heads, d). The softmax runs in
    float32 whatever their dtype (bfloat16's 8-bit mantissa would blur the weights); both matmuls in
    theirs (flax's own keeps the second in float32 after a float32 softmax)."""
    weights = nn.dot_product_attention_weights(query, key, force_fp32_for_softmax=True)
    return jnp.einsum("...hqk,...khd->...qhd", weights.astype(value.dtype), value)


class AttnBlock(nn.Module):
    """Residual self-attention over the H*W positions. (B, H, W, C) -> same shape."""

    num_groups: int
    num_heads: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(self.num_groups, dtype=self.dtype)(x).reshape(b, hgt * wid, c)
        h = nn.MultiHeadDotProductAttention(self.num_heads, out_kernel_init=nn.initializers.zeros, dtype=self.dtype,
                                            attention_fn=attention)(h)
        return x + h.reshape(x.shape)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]). x: (B, H, W, C) float32; t: (B,) int; y: (B,) int or None -> (B, H, W, C) float32.

    With num_classes > 0, y in [-1, num_classes]; label num_classes, -1 or y=None means
    'no label', the unconditional branch used by classifier-free guidance.
    image_size (0 = unknown) lets configuration mistakes surface when the model is built.
    """

    channels: int = 32
    channel_mults: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (7,)
    dropout: float = 0.1
    num_groups: int = 8
    num_classes: int = 0
    image_size: int = 0
    num_heads: int = 1
    patch_size: int = 1
    downsample_padding: str = "symmetric"  # stride-2 convs: 'symmetric' (1 px each side) or 'same' (TF's, Ho et al.'s)
    dtype: Any = jnp.float32  # computation dtype (float32 or bfloat16); parameters are float32 either way

    def __post_init__(self):
        super().__post_init__()
        if self.image_size:
            self._check_config(self.image_size, self.image_size)

    def _check_config(self, height: int, width: int):
        """Raise a one-line UserError for a config that cannot build on (height, width) images."""
        if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise UserError(f"--config.model.downsample_padding must be one of {', '.join(DOWNSAMPLE_PADDINGS)}, "
                            f"got {self.downsample_padding!r}")
        p = self.patch_size
        if p < 1 or height % p or width % p:
            raise UserError(f"--config.model.patch_size ({p}) must be >= 1 and divide the image size "
                            f"{height}x{width}")
        height, width = height // p, width // p
        # GroupNorm sees every level's width and, through the first skip connection, conv_in's
        # `channels` itself: num_groups must divide them all.
        widths = [self.channels * mult for mult in self.channel_mults]
        bad = sorted({w for w in [self.channels, *widths] if self.num_groups < 1 or w % self.num_groups})
        if bad:
            raise UserError(f"GroupNorm needs --config.model.num_groups ({self.num_groups}) to divide "
                            f"--config.model.channels ({self.channels}) and every level's width "
                            f"channels * channel_mults ({', '.join(map(str, widths))}); "
                            f"{', '.join(map(str, bad))} {'is' if len(bad) == 1 else 'are'} not a multiple of it")
        sizes = [(height >> i, width >> i) for i in range(len(self.channel_mults))]
        for i, (hh, ww) in enumerate(sizes[:-1]):
            if hh % 2 or ww % 2:
                raise UserError(f"level {i} of the U-Net is {hh}x{ww}, which cannot be halved: use fewer "
                                f"--config.model.channel_mults ({len(self.channel_mults)} levels for {height}x{width})")
        missing = [r for r in self.attention_resolutions if r not in {s[0] for s in sizes}]
        if missing:
            raise UserError(f"--config.model.attention_resolutions {missing} match no level size "
                            f"({', '.join(str(s[0]) for s in sizes)}) for {height}x{width} images")

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        self._check_config(x.shape[1], x.shape[2])
        gn, drop, dt = self.num_groups, self.dropout, self.dtype
        emb = sinusoidal_embedding(t, self.channels)  # (B, channels), float32
        emb = nn.Dense(4 * self.channels, dtype=dt)(nn.silu(nn.Dense(4 * self.channels, dtype=dt)(emb)))  # (B, 4 ch)
        if self.num_classes:
            # 'No label' is num_classes; a negative label means it too (the guided sampler's convention).
            y = jnp.full(t.shape, self.num_classes, jnp.int32) if y is None else jnp.where(y < 0, self.num_classes, y)
            emb = emb + nn.Embed(self.num_classes + 1, emb.shape[-1], name="label_emb", dtype=dt)(y)
        elif y is not None:
            raise UserError("this U-Net is unconditional (--config.model.num_classes=0): it takes no labels")

        p, image = self.patch_size, x
        if p > 1:
            x = einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=p, q=p)
        h = Conv(self.channels, (3, 3), name="conv_in", dtype=dt)(x)  # (B, H/p, W/p, channels)
        skips = [h]
        # TF's SAME pads a stride-2 3x3 conv of an even size by 0 before and 1 after.
        down_pad = ((1, 1), (1, 1)) if self.downsample_padding == "symmetric" else "SAME"
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, gn, drop, dt)(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = AttnBlock(gn, self.num_heads, dt)(h)
                skips.append(h)
            if level < len(self.channel_mults) - 1:  # halve H and W (checked even above)
                h = Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=down_pad, dtype=dt)(h)
                skips.append(h)

        h = ResBlock(h.shape[-1], gn, drop, dt)(h, emb, train)  # middle: res, attn, res
        h = AttnBlock(gn, self.num_heads, dt)(h)
        h = ResBlock(h.shape[-1], gn, drop, dt)(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            # One more block than on the way down: it takes the skip saved by the downsampling conv.
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(self.channels * mult, gn, drop, dt)(jnp.concatenate([h, skips.pop()], -1), emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = AttnBlock(gn, self.num_heads, dt)(h)
            if level > 0:  # nearest-neighbour x2, then a conv to smooth the blockiness
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = Conv(h.shape[-1], (3, 3), dtype=dt)(h)

        h = nn.silu(nn.GroupNorm(gn, dtype=dt)(h))
        # Zero init: the untrained model predicts eps = 0, a sane start for the loss.
        out = Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, name="conv_out", dtype=dt)(h)
        if p > 1:
            out = einops.rearrange(out, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p, c=image.shape[-1])
        return out.astype(jnp.float32)  # the loss and the samplers work in float32
