"""Ho et al. (2020)'s CIFAR-10 model and recipe: `python train.py --config configs/cifar10.py`.

Their `unet2d16b2` (diffusion_tf/models/unet.py, scripts/run_cifar.py): the U-Net at widths
128, 256, 256, 256 on 32x32, 16x16, 8x8, 4x4, two residual blocks per level, self-attention
at 16x16, GroupNorm with 32 groups, dropout 0.1, TF's SAME padding in the stride-2 convs:
35,746,307 parameters (their "35.7M"). Linear betas 1e-4..0.02 over T = 1000, eps-prediction
with L_simple; Adam 2e-4 after a 5,000-step linear warm-up, gradient norm clipped at 1, batch
128, random horizontal flips, EMA 0.9999, 800k steps. Their FID 3.17 was measured on 50k
samples of the EMA weights with the ancestral sampler over all 1000 steps, sigma^2 = beta,
this config's sample defaults.

Where it differs from theirs: flax's default initialisers (Glorot-uniform there), and the EMA
decay warms up, min(0.9999, (1 + n) / (10 + n)), where theirs is 0.9999 from the first update.

A GPU's job (800k steps of a 35.7M-parameter network); on one, `--config.model.dtype=bfloat16`
computes in bfloat16 with float32 parameters, optimiser state and loss. Faster sampling than
1000 steps: `python sample.py --ckpt runs/cifar10 --steps 100` (ancestral on 100 respaced steps);
the deterministic samplers (`--sampler ddim` or `dpmpp_2m`, 10-50 steps) are faster still, but
eps-prediction models turn some of their samples into noise (see the README), which
`--config.diffusion.prediction=v` avoids at the price of departing from the paper.
"""

from ddpm_jax.config import unet_config

STEPS = 800_000
STEPS_PER_EPOCH = 50_000 // 128  # the 50k training images, full batches only


def get_config():
    config = unet_config("cifar10")
    config.data.random_flip = True

    config.diffusion.schedule = "linear"
    config.diffusion.n_steps = 1000
    config.diffusion.beta_min, config.diffusion.beta_max = 1e-4, 0.02
    config.diffusion.prediction = "eps"
    config.diffusion.loss_weighting = "none"

    config.model.channels = 128
    config.model.channel_mults = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_groups = 32
    config.model.downsample_padding = "same"

    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip_norm = 1.0

    config.train.batch_size = 128
    config.train.max_steps = STEPS
    config.train.num_epochs = -(-STEPS // STEPS_PER_EPOCH)  # 2052: max_steps ends the run
    config.train.ema_decay = 0.9999
    config.train.checkpoint_every_steps = 10_000
    config.train.log_every_steps = 100
    config.train.tensorboard = True
    config.train.sample_every_steps = 50_000

    config.sample.sampler = "ddpm"
    config.sample.steps = 0
    config.sample.sigma = "beta"
    return config
