"""A PyTorch re-statement of the article's model and training step, for side-by-side timing.

    pip install torch==2.13.0            # CPU build; an optional extra, never a dependency
    python benchmarks/torch_article.py train [--batch 128] [--steps 30] [--threads 2] [--json out.json]
    python benchmarks/torch_article.py sample [--num 100] [--n-steps 1000] [--json out.json]

Same network (the article's U-Net: 506,852 trainable parameters), same
loss (MSE on eps at a uniform t), same optimizer (Adam 1e-3), same sampler
(Algorithm 2, sigma^2 = beta), eager PyTorch as in the article. Random uint8
data; images/s is the median over the timed steps.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
from torch import nn


def time_table(n_steps, dim):
    """The article's table: columns 2k, 2k+1 = sin, cos of t * 10000^(-4k/dim)."""
    freqs = 10000.0 ** (-2.0 * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(n_steps, dtype=torch.float64)[:, None] * freqs
    table = torch.zeros(n_steps, dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return table.float()


class Block(nn.Module):
    def __init__(self, shape, c_in, c_out, normalize=True):
        super().__init__()
        self.norm = nn.LayerNorm(shape)
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.normalize = normalize

    def forward(self, x):
        x = self.norm(x) if self.normalize else x
        return nn.functional.silu(self.conv2(nn.functional.silu(self.conv1(x))))


def time_mlp(dim, c):
    return nn.Sequential(nn.Linear(dim, c), nn.SiLU(), nn.Linear(c, c))


def level(size, widths, c_in, last_norm=True):
    blocks, c = [], c_in
    for i, w in enumerate(widths):
        blocks.append(Block((c, size, size), c, w, normalize=last_norm or i < len(widths) - 1))
        c = w
    return nn.Sequential(*blocks)


class ArticleUNet(nn.Module):
    def __init__(self, n_steps=1000, dim=100):
        super().__init__()
        self.register_buffer("table", time_table(n_steps, dim))
        self.te = nn.ModuleList(time_mlp(dim, c) for c in (1, 10, 20, 40, 80, 40, 20))
        self.b1, self.b2, self.b3 = level(28, (10, 10, 10), 1), level(14, (20, 20, 20), 10), level(7, (40, 40, 40), 20)
        self.down1, self.down2 = nn.Conv2d(10, 10, 4, 2, 1), nn.Conv2d(20, 20, 4, 2, 1)
        self.down3 = nn.Sequential(nn.Conv2d(40, 40, 2, 1), nn.SiLU(), nn.Conv2d(40, 40, 4, 2, 1))
        self.mid = level(3, (20, 20, 40), 40)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(40, 40, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(40, 40, 2, 1))
        self.b4 = level(7, (40, 20, 20), 80)
        self.up2 = nn.ConvTranspose2d(20, 20, 4, 2, 1)
        self.b5 = level(14, (20, 10, 10), 40)
        self.up3 = nn.ConvTranspose2d(10, 10, 4, 2, 1)
        self.b_out = level(28, (10, 10, 10), 20, last_norm=False)
        self.conv_out = nn.Conv2d(10, 1, 3, 1, 1)

    def forward(self, x, t):
        emb = self.table[t]
        te = [mlp(emb)[:, :, None, None] for mlp in self.te]
        o1 = self.b1(x + te[0])
        o2 = self.b2(self.down1(o1) + te[1])
        o3 = self.b3(self.down2(o2) + te[2])
        mid = self.mid(self.down3(o3) + te[3])
        o4 = self.b4(torch.cat([o3, self.up1(mid)], 1) + te[4])
        o5 = self.b5(torch.cat([o2, self.up2(o4)], 1) + te[5])
        out = self.b_out(torch.cat([o1, self.up3(o5)], 1) + te[6])
        return self.conv_out(out)


def schedule(n_steps):
    betas = torch.linspace(1e-4, 0.02, n_steps, dtype=torch.float64)
    alphas = 1 - betas
    return betas.float(), alphas.float(), torch.cumprod(alphas, 0).float()


def info():
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def make_train_step(batch, n_steps=1000):
    """The article's training step on random uint8 data: step(i) draws a batch, t and eps, and
    takes one Adam step on the MSE of eps (the model: a fresh ArticleUNet)."""
    model = ArticleUNet(n_steps)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 506_852
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    _, _, alpha_bars = schedule(n_steps)
    data = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8)

    def step(i):
        idx = torch.randint(0, data.shape[0], (batch,))
        x0 = (data[idx].float() / 255 - 0.5) * 2
        eps = torch.randn_like(x0)
        t = torch.randint(0, n_steps, (batch,))
        ab = alpha_bars[t].reshape(-1, 1, 1, 1)
        loss = nn.functional.mse_loss(model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t), eps)
        optim.zero_grad()
        loss.backward()
        optim.step()
        return loss.item()

    return step


def bench_train(args):
    step = make_train_step(args.batch, args.n_steps)
    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"benchmark": "torch_train_throughput", "batch_size": args.batch, "timed_steps": args.steps,
            "images_per_s": round(args.batch / seconds, 1), "step_ms_median": round(1000 * seconds, 2), **info()}


@torch.no_grad()
def bench_sample(args):
    model = ArticleUNet(args.n_steps).eval()
    betas, alphas, alpha_bars = schedule(args.n_steps)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        x = torch.randn(args.num, 1, 28, 28)
        for t in range(args.n_steps - 1, -1, -1):
            eps = model(x, torch.full((args.num,), t, dtype=torch.long))
            x = (x - (1 - alphas[t]) / (1 - alpha_bars[t]).sqrt() * eps) / alphas[t].sqrt()
            if t > 0:
                x = x + betas[t].sqrt() * torch.randn_like(x)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"benchmark": "torch_sample_throughput", "num_samples": args.num, "n_steps": args.n_steps,
            "images_per_s": round(args.num / seconds, 3), "seconds_all": [round(t, 2) for t in times], **info()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["train", "sample"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--n-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = bench_train(args) if args.mode == "train" else bench_sample(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
