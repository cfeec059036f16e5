"""Makes tests/golden/article_unet_torch.npz: the article's PyTorch U-Net on a fixed input with
weights from a formula, the reference for tests/test_model.py's numerical parity test.

    pip install torch==2.13.0     # CPU build; only this script needs it, the test does not
    python tests/golden/make_article_golden.py

The model is benchmarks/torch_article.py's re-statement of the article's `MyUNet`.
Every trainable tensor, number k in `model.named_parameters()` order, in PyTorch's own
layout (Conv2d OIHW, ConvTranspose2d (in, out, kH, kW), Linear (out, in), LayerNorm (C, H, W)), is

    w.flatten()[j] = a * sin(j + k)

computed in float64 and stored as float32, with a = 2 / sqrt(numel / shape[0]) for conv and
linear weights (about the scale that keeps activations O(1) through the network), 0.05 for
biases, and 1 + 0.05 sin(j + k) for LayerNorm weights. The input x (4, 1, 28, 28), NCHW, is
x.flatten()[j] = round(64 sin(0.37 j)) / 64 (stored exactly as int8 x * 64), the timesteps
0, 1, 500, 999. The file holds x_times_64 (NCHW int8), t, the output (NCHW, float32) and the
parameter names in order (so the test can check its mapping). Torch runs in float32 on one thread.
"""

import importlib.util
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "article_unet_torch.npz")
TIMESTEPS = [0, 1, 500, 999]


def formula(shape: tuple, k: int, layer_norm_weight: bool) -> np.ndarray:
    """Tensor k's weights in PyTorch's layout (its `shape`)."""
    numel = int(np.prod(shape))
    wave = np.sin(np.arange(numel, dtype=np.float64) + k)
    if layer_norm_weight:
        w = 1.0 + 0.05 * wave
    elif len(shape) == 1:  # biases
        w = 0.05 * wave
    else:
        w = 2.0 / np.sqrt(numel / shape[0]) * wave
    return w.astype(np.float32).reshape(shape)


def article_input() -> np.ndarray:
    """(4, 1, 28, 28) float32, NCHW, exactly representable: multiples of 1/64."""
    return (np.round(64 * np.sin(0.37 * np.arange(4 * 28 * 28))) / 64).astype(np.float32).reshape(4, 1, 28, 28)


def main():
    import torch  # only here: tests import formula() and article_input() without torch

    spec = importlib.util.spec_from_file_location("torch_article", os.path.join(ROOT, "benchmarks", "torch_article.py"))
    torch_article = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_article)
    torch.set_num_threads(1)
    model = torch_article.ArticleUNet(n_steps=1000, dim=100).eval()
    names = []
    with torch.no_grad():
        for k, (name, p) in enumerate(model.named_parameters()):
            p.copy_(torch.from_numpy(formula(tuple(p.shape), k, name.endswith("norm.weight"))))
            names.append(name)
        x = article_input()
        out = model(torch.from_numpy(x), torch.tensor(TIMESTEPS, dtype=torch.long)).numpy()
    np.savez_compressed(OUT, x_times_64=(x * 64).astype(np.int8), t=np.asarray(TIMESTEPS, np.int32),
                        out=out.astype(np.float32), names=np.asarray(names),
                        torch_version=np.asarray(torch.__version__))
    print(f"wrote {OUT}: output std {out.std():.4f}, max |out| {np.abs(out).max():.4f}, "
          f"{len(names)} tensors, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    sys.exit(main())
