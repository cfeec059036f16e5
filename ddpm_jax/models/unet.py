"""A configurable DDPM U-Net (Ho et al. 2020; Nichol & Dhariwal 2021 style), flax.linen, NHWC.

Levels at sizes S, S/2, ... (one per entry of channel_mults, width channels * mult),
each with num_res_blocks residual blocks [GroupNorm -> SiLU -> Conv3x3 -> + Dense(emb)
-> GroupNorm -> SiLU -> Dropout -> Conv3x3], self-attention at the sizes in
attention_resolutions, stride-2 conv down, nearest-neighbour + conv up, a
res / attn / res middle and skip connections after every block (as in Ho et al.).
Optional class conditioning: a learnt label embedding added to the time embedding.
With patch_size p > 1 the U-Net runs on (H/p, W/p, p*p*C) patches (space-to-depth in,
depth-to-space out): fewer, wider feature maps, which CPUs and GEMM units run far faster
than many narrow ones (see the README's "Fast configs").
"""

from __future__ import annotations

import math

import einops
import jax.numpy as jnp
import flax.linen as nn

from ddpm_jax.errors import UserError


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

    @nn.compact
    def __call__(self, x, emb, train: bool):
        h = nn.Conv(self.features, (3, 3))(nn.silu(nn.GroupNorm(self.num_groups)(x)))
        h = h + nn.Dense(self.features)(nn.silu(emb))[:, None, None, :]  # per-channel time/label shift
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(nn.GroupNorm(self.num_groups)(h)))
        # Zero init: each block starts as the identity, which keeps deep stacks stable early on.
        h = nn.Conv(self.features, (3, 3), kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), name="skip")(x)
        return x + h


class AttnBlock(nn.Module):
    """Residual self-attention over the H*W positions. (B, H, W, C) -> same shape."""

    num_groups: int
    num_heads: int = 1

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(self.num_groups)(x).reshape(b, hgt * wid, c)
        h = nn.MultiHeadDotProductAttention(self.num_heads, out_kernel_init=nn.initializers.zeros)(h)
        return x + h.reshape(x.shape)


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]). x: (B, H, W, C) float32; t: (B,) int; y: (B,) int or None -> (B, H, W, C).

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

    def __post_init__(self):
        super().__post_init__()
        if self.image_size:
            self._check_config(self.image_size, self.image_size)

    def _check_config(self, height: int, width: int):
        """Raise a one-line UserError for a config that cannot build on (height, width) images."""
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
        gn, drop = self.num_groups, self.dropout
        emb = sinusoidal_embedding(t, self.channels)  # (B, channels)
        emb = nn.Dense(4 * self.channels)(nn.silu(nn.Dense(4 * self.channels)(emb)))  # (B, E), E = 4 channels
        if self.num_classes:
            # 'No label' is num_classes; a negative label means it too (the guided sampler's convention).
            y = jnp.full(t.shape, self.num_classes, jnp.int32) if y is None else jnp.where(y < 0, self.num_classes, y)
            emb = emb + nn.Embed(self.num_classes + 1, emb.shape[-1], name="label_emb")(y)
        elif y is not None:
            raise UserError("this U-Net is unconditional (--config.model.num_classes=0): it takes no labels")

        p, image = self.patch_size, x
        if p > 1:
            x = einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=p, q=p)
        h = nn.Conv(self.channels, (3, 3), name="conv_in")(x)  # (B, H/p, W/p, channels)
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.channels * mult, gn, drop)(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = AttnBlock(gn, self.num_heads)(h)
                skips.append(h)
            if level < len(self.channel_mults) - 1:  # halve H and W (checked even above)
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(h)
                skips.append(h)

        h = ResBlock(h.shape[-1], gn, drop)(h, emb, train)  # middle: res, attn, res
        h = AttnBlock(gn, self.num_heads)(h)
        h = ResBlock(h.shape[-1], gn, drop)(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            # One more block than on the way down: it takes the skip saved by the downsampling conv.
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(self.channels * mult, gn, drop)(jnp.concatenate([h, skips.pop()], -1), emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = AttnBlock(gn, self.num_heads)(h)
            if level > 0:  # nearest-neighbour x2, then a conv to smooth the blockiness
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = nn.Conv(h.shape[-1], (3, 3))(h)

        h = nn.silu(nn.GroupNorm(gn)(h))
        # Zero init: the untrained model predicts eps = 0, a sane start for the loss.
        out = nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(h)
        if p > 1:
            out = einops.rearrange(out, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p, c=image.shape[-1])
        return out
