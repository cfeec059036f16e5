"""The article's small time-conditioned U-Net, as a flax.linen module (NHWC).

Structure, layer for layer, as in "Generating images with DDPMs: a PyTorch
implementation" (`MyUNet`): levels 28 -> 14 -> 7 -> 3 with 10 / 20 / 40 channels,
blocks of [LayerNorm over (H, W, C) -> Conv3x3 -> SiLU -> Conv3x3 -> SiLU], a
fixed sinusoidal time table and one small MLP per level whose output is added
to that level's input. 506,852 trainable parameters.

Initialisation follows PyTorch's defaults (weights and biases uniform in
+-1/sqrt(fan_in)), so training starts where the article's does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax.linen.dtypes import promote_dtype

from ddpm_jax.models.convs import fast_conv, stride_two_conv_transpose
from ddpm_jax.models.cpu_kernels import conv, layer_norm, silu


def article_sinusoidal_table(n_steps: int, dim: int) -> np.ndarray:
    """The article's time table, shape (n_steps, dim), float32.

    Columns 2k and 2k+1 hold sin and cos of t * 10000^(-4k/dim). (The usual
    embedding uses 10000^(-2k/dim); the article's quirk leaves half of the
    frequencies nearly constant. The faithful model keeps it.)
    """
    t = np.arange(n_steps, dtype=np.float64)[:, None]
    freqs = 10000.0 ** (-2.0 * np.arange(0, dim, 2, dtype=np.float64) / dim)  # j = 2k -> 10000^(-4k/dim)
    table = np.zeros((n_steps, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(t * freqs)
    table[:, 1::2] = np.cos(t * freqs[: dim // 2])
    return table.astype(np.float32)


def _torch_uniform(fan_in: int):
    """PyTorch's default init for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """PyTorch's Conv2d(kernel_size, strides, padding) with its default init, as nn.Conv: the same
    parameters ('kernel' (k, k, C, O), 'bias' (O,)), created in the same order, so the same init.
    silu=True returns SiLU(conv + bias), the bias and the activation in one pass
    (cpu_kernels.silu(y, bias): XLA:CPU adds a 10- or 20-channel bias slowly). The sums run in
    convs.fast_conv (the CPU kernel; stride 2 after space to depth)."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    silu: bool = False

    @nn.compact
    def __call__(self, x):
        k, p = self.kernel_size, self.padding
        init = _torch_uniform(x.shape[-1] * k * k)
        kernel = self.param("kernel", init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        x, kernel, bias = promote_dtype(x, kernel, bias)
        y = fast_conv(x, kernel, (self.strides, self.strides), ((p, p), (p, p)),
                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return silu(y, bias) if self.silu else y + bias


class StrideOneConvTranspose(nn.Module):
    """PyTorch's ConvTranspose2d(k, stride=1, padding=p): out = in + k - 1 - 2p, with
    nn.ConvTranspose(transpose_kernel=True)'s parameters (kernel (k, k, O, C), bias (O,), in that
    order) and PyTorch's init (fan_in from the output channels). At stride 1 it is the convolution
    with the kernel flipped in space and its channel axes swapped, padded by k - 1 - p."""

    features: int
    kernel_size: int
    padding: int = 0

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        init = _torch_uniform(self.features * k * k)
        kernel = self.param("kernel", init, (k, k, self.features, x.shape[-1]))
        bias = self.param("bias", init, (self.features,))
        x, kernel, bias = promote_dtype(x, kernel, bias)
        return conv(x, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), k - 1 - self.padding) + bias


class StrideTwoConvTranspose(nn.Module):
    """PyTorch's ConvTranspose2d(k=4, stride=2, padding=1), computed as a stride-1 3x3 convolution
    (convs.stride_two_conv_transpose). The parameters are nn.ConvTranspose(transpose_kernel=True)'s:
    kernel (4, 4, O, C), bias (O,). x: (B, H, W, C) -> (B, 2H, 2W, O)."""

    features: int

    @nn.compact
    def __call__(self, x):
        fan_in = self.features * 16  # PyTorch takes a transposed conv's fan_in from its output channels
        kernel = self.param("kernel", _torch_uniform(fan_in), (4, 4, self.features, x.shape[-1]))
        bias = self.param("bias", _torch_uniform(fan_in), (self.features,))
        return stride_two_conv_transpose(x, kernel) + bias


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm((C, H, W)) of the article, over (H, W, C): one scale and bias per element,
    eps 1e-5, the exact two-pass variance (the fast E[x^2] - E[x]^2 form loses the offset
    invariance that the article's model has). Its parameters are nn.LayerNorm's ('scale' ones,
    'bias' zeros, shape (H, W, C)); cpu_kernels.layer_norm computes it."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, x.shape[-3:])
        bias = self.param("bias", nn.initializers.zeros, x.shape[-3:])
        return layer_norm(x, scale, bias, self.epsilon)


class Block(nn.Module):
    """[LayerNorm over (H, W, C)] -> Conv3x3 -> SiLU -> Conv3x3 -> SiLU; keeps H and W."""

    features: int
    normalize: bool = True
    norm_after_conv: bool = False  # normalise the first conv's output instead of the input

    @nn.compact
    def __call__(self, x):
        norm = LayerNorm()
        if self.norm_after_conv:
            x = silu(norm(Conv(self.features, 3, padding=1)(x)))
        else:
            normed = norm(x)
            # The article builds the LayerNorm even where it does not apply it (the
            # very last block): its parameters exist, count, and never get a gradient.
            # Keeping them keeps the parameter count (506,852) and a 1:1 map to its state dict.
            x = Conv(self.features, 3, padding=1, silu=True)(normed if self.normalize else x)
        return Conv(self.features, 3, padding=1, silu=True)(x)


class TimeMLP(nn.Module):
    """Dense -> SiLU -> Dense, mapping the time embedding to `features` channels."""

    features: int

    @nn.compact
    def __call__(self, emb):
        h = nn.Dense(self.features, kernel_init=_torch_uniform(emb.shape[-1]), bias_init=_torch_uniform(emb.shape[-1]))(emb)
        h = silu(h)
        return nn.Dense(self.features, kernel_init=_torch_uniform(self.features),
                        bias_init=_torch_uniform(self.features))(h)


class ArticleUNet(nn.Module):
    """eps_theta(x_t, t) of the article. x: (B, 28, 28, C) float32; t: (B,) int in [0, n_steps).

    normalize_input=False is the one-change fix ('article_unet_fixed'): the first
    LayerNorm, which normalises the input image itself and so hides its brightness
    and contrast from the network (and the level's time signal with them),
    normalises the first convolution's output instead.
    """

    n_steps: int = 1000
    time_emb_dim: int = 100
    normalize_input: bool = True

    def _level(self, x, emb, widths, name, normalize_last=True, norm_after_conv_first=False):
        x = x + TimeMLP(x.shape[-1], name=f"te_{name}")(emb)[:, None, None, :]
        for i, width in enumerate(widths):
            x = Block(width, normalize=normalize_last or i < len(widths) - 1,
                      norm_after_conv=norm_after_conv_first and i == 0, name=f"{name}_{i}")(x)
        return x

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False):
        # y and train are the project's model interface; this model is unconditional and has no dropout.
        if y is not None:
            raise ValueError("the article's U-Net is unconditional: it takes no labels")
        # A constant, not a parameter: it is not trained (the article freezes it).
        emb = jnp.asarray(article_sinusoidal_table(self.n_steps, self.time_emb_dim))[t]  # (B, D)
        out_channels = x.shape[-1]

        out1 = self._level(x, emb, (10, 10, 10), "b1", norm_after_conv_first=not self.normalize_input)  # (B, 28, 28, 10)
        out2 = self._level(Conv(10, 4, 2, 1, name="down1")(out1), emb, (20, 20, 20), "b2")  # (B, 14, 14, 20)
        out3 = self._level(Conv(20, 4, 2, 1, name="down2")(out2), emb, (40, 40, 40), "b3")  # (B, 7, 7, 40)

        h = Conv(40, 2, silu=True, name="down3_a")(out3)  # (B, 6, 6, 40)
        h = Conv(40, 4, 2, 1, name="down3_b")(h)  # (B, 3, 3, 40)
        mid = self._level(h, emb, (20, 20, 40), "b_mid")  # (B, 3, 3, 40)

        h = silu(StrideTwoConvTranspose(40, name="up1_a")(mid))  # (B, 6, 6, 40)
        h = StrideOneConvTranspose(40, 2, name="up1_b")(h)  # (B, 7, 7, 40)
        out4 = self._level(jnp.concatenate([out3, h], -1), emb, (40, 20, 20), "b4")  # (B, 7, 7, 20)

        h = StrideTwoConvTranspose(20, name="up2")(out4)  # (B, 14, 14, 20)
        out5 = self._level(jnp.concatenate([out2, h], -1), emb, (20, 10, 10), "b5")  # (B, 14, 14, 10)

        h = StrideTwoConvTranspose(10, name="up3")(out5)  # (B, 28, 28, 10)
        out = self._level(jnp.concatenate([out1, h], -1), emb, (10, 10, 10), "b_out", normalize_last=False)
        return Conv(out_channels, 3, padding=1, name="conv_out")(out)  # (B, 28, 28, C)
