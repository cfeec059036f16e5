"""Convolution forms that XLA:CPU runs fast: stride 2 computed at stride 1, stride 1 in the CPU kernel.

`nn.Conv(..., conv_general_dilated=fast_conv)` keeps nn.Conv's parameters, names and init and
changes only how the sums are computed: XLA:CPU runs a strided convolution's kernel gradient (a
convolution with a dilated window) at a fraction of the stride-1 rate, and its stride-1
convolutions of few channels at a fraction of the vector unit's (README: Where the time goes;
benchmarks/step_profile.py, benchmarks/conv_layers.py).
`stride_two_conv_transpose(x, kernel)` is PyTorch's ConvTranspose2d(4, 2, 1) as one stride-1 3x3
convolution and depth to space. The stride-1 convolutions they come to run in cpu_kernels.conv
(the compiled CPU kernel, where it applies).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ddpm_jax.models.cpu_kernels import conv


def fast_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated, with NHWC x HWIO convolutions of stride 1 and 2 computed in the
    forms that run fast on XLA:CPU: `nn.Conv(..., conv_general_dilated=fast_conv)`.

    Stride 1 (a square kernel, the same padding p < k on every side) runs in cpu_kernels.conv,
    the compiled CPU kernel. Stride 2: the padded input's 2x2 pixel phases become channels (space
    to depth) and the k x k kernel, zero-padded to an even size, the matching ceil(k/2)-sized
    kernel over them, at stride 1: the same sums. Anything else (other strides, dilations,
    groups, layouts, negative or uneven padding at stride 1, a precision) goes to
    lax.conv_general_dilated unchanged.
    lhs: (B, H, W, C), rhs: (kh, kw, C, O) -> (B, (H + pads - kh) // stride + 1, ..., O).
    """
    def direct():
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)

    plain = all(d == 1 for d in tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
    strides = tuple(window_strides)
    if lhs.ndim != 4 or strides not in ((1, 1), (2, 2)) or not plain or feature_group_count != 1:
        return direct()
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        return direct()
    kh, kw, c, features = rhs.shape
    pads = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), strides, padding) if isinstance(padding, str) else padding
    own_kernel = precision is None and all(value is None for value in kwargs.values())
    if min(min(p) for p in pads) < 0:
        return direct()
    if strides == (1, 1):  # cpu_kernels.conv checks the kernel's shape and padding itself
        p = pads[0][0]
        if own_kernel and all(tuple(pad) == (p, p) for pad in pads):
            return conv(lhs, rhs, p)
        return direct()
    x = jnp.pad(lhs, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // 2 + 1, (x.shape[2] - kw) // 2 + 1
    ka, kb = -(-kh // 2), -(-kw // 2)  # the phase kernel's size
    # The phases cover 2 (out + k_half - 1) rows: rows past the last window are cut (they
    # meet no tap), missing ones are zeros (they meet the kernel's zero padding).
    rows, cols = 2 * (out_h + ka - 1), 2 * (out_w + kb - 1)
    x = x[:, :rows, :cols]
    x = jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2]), (0, 0)))
    b = x.shape[0]
    # x[2i + p, 2j + q] -> phases[i, j, (p, q, c)]; rhs[2a + p, 2b + q] -> kernel[a, b, (p, q, c)]
    phases = x.reshape(b, rows // 2, 2, cols // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    phases = phases.reshape(b, rows // 2, cols // 2, 4 * c)
    kernel = jnp.pad(rhs, ((0, 2 * ka - kh), (0, 2 * kb - kw), (0, 0), (0, 0)))
    kernel = kernel.reshape(ka, 2, kb, 2, c, features).transpose(0, 2, 1, 3, 4, 5).reshape(ka, kb, 4 * c, features)
    if own_kernel:
        return conv(phases, kernel, 0)
    return lax.conv_general_dilated(phases, kernel, (1, 1), "VALID", dimension_numbers=nhwc,
                                    precision=precision, **kwargs)


# PyTorch's ConvTranspose2d(k=4, stride=2, padding=1) along one axis: output 2m + r takes input
# m - 1 + u (u = 0, 1, 2 over the input padded by one) times kernel tap _SUBPIXEL_TAPS[r][u]
# (4: no tap, a zero).
_SUBPIXEL_TAPS = np.array([[3, 1, 4], [4, 2, 0]])


def stride_two_conv_transpose(x, kernel):
    """PyTorch's ConvTranspose2d(k=4, stride=2, padding=1) without its bias, computed as a
    stride-1 3x3 convolution. kernel: nn.ConvTranspose(transpose_kernel=True)'s (4, 4, O, C).

    Each of the output's 2x2 pixel phases is a small stride-1 convolution of the input; one
    3x3 convolution computes all four as channels (the taps a phase does not use are zeros),
    then depth to space. XLA:CPU runs the input-dilated form and its gradients slowly; the
    2.25x multiply-adds of the zero taps cost less (benchmarks/step_profile.py).
    x: (B, H, W, C) -> (B, 2H, 2W, O).
    """
    b, h, w, c = x.shape
    features = kernel.shape[2]
    taps = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # index 4: the zero tap
    rows = _SUBPIXEL_TAPS[:, :, None, None]  # (r, u, 1, 1)
    cols = _SUBPIXEL_TAPS[None, None, :, :]  # (1, 1, s, v)
    taps = taps[rows, cols]  # (r, u, s, v, O, C)
    taps = taps.transpose(1, 3, 5, 0, 2, 4).reshape(3, 3, c, 4 * features)  # (u, v, C, (r, s, O))
    y = conv(x, taps, 1)
    y = y.reshape(b, h, w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, features)
