"""The base experiment config and the rules about which of its fields define a run.

`configs/*.py` start from `base_config()` and override fields; the CLIs accept
`--config.a.b=value` for every field (ml_collections' config_flags).
"""

from __future__ import annotations

import json

import ml_collections

# Fields that only say how long to train, how often to save or log, or where
# things are: they may change when a run is resumed. Every other field defines
# the run (model, data, diffusion, optimiser, batch size, seed) and must match
# the checkpoint's.
RESUMABLE_FIELDS = frozenset({
    "train.num_epochs",
    "train.max_steps",
    "train.max_minutes",
    "train.steps_per_chunk",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.sample_every_epochs",
    "train.log_every_steps",
    "train.progress",
    "data.data_dir",
    "data.manual_dir",
    "data.placement",
    "train.tensorboard",
    "train.sample_every_steps",
    "sample",
    "distributed",
})


def base_config() -> ml_collections.ConfigDict:
    """The article's settings (Fashion-MNIST, T=1000, linear betas 1e-4..0.02, batch 128, Adam 1e-3, 20 epochs)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "fashion_mnist"  # a tfds image dataset ('mnist', 'cifar10', 'celeb_a', ...) or 'folder'
    config.data.data_dir = ""  # tfds data_dir; '' = tfds' default (~/tensorflow_datasets)
    config.data.manual_dir = ""  # folder with the official .gz archives, for machines without internet
    config.data.path = ""  # data.name = 'folder': a folder of PNG/JPEG images (any size, grayscale or RGB)
    config.data.image_size = 0  # > 0: resize (shorter side) and centre-crop to image_size x image_size; 0 = as stored
    config.data.channels = 0  # 1 (grayscale) or 3 (RGB); 0 = as the dataset stores them
    config.data.random_flip = False  # horizontal flips, drawn from each step's key (exact resume holds)
    config.data.placement = "auto"  # 'device' (whole set on the accelerator), 'stream' (chunk by chunk from
    # the host, prefetched) or 'auto' (device when it fits); the batches, and so the results, are the same

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"  # or 'cosine' (Nichol & Dhariwal 2021; ignores beta_min/beta_max)
    config.diffusion.n_steps = 1000
    config.diffusion.beta_min = 1e-4
    config.diffusion.beta_max = 0.02
    config.diffusion.prediction = "eps"  # what the network predicts: 'eps' (Ho et al.) or 'v' (Salimans & Ho 2022)
    config.diffusion.loss_weighting = "none"  # 'none' (L_simple) or 'min_snr' (Hang et al. 2023)
    config.diffusion.snr_gamma = 5.0  # min_snr's gamma

    config.model = ml_collections.ConfigDict()
    config.model.name = "article_unet"  # 'article_unet', 'article_unet_fixed' or 'unet' (see models/)
    config.model.time_emb_dim = 100  # article_unet*: width of the article's time table
    config.model.num_classes = 0  # > 0: class-conditional on labels 0..num_classes-1 (label num_classes = none)
    # 'unet' only (residual blocks, GroupNorm, attention; see models/unet.py):
    config.model.channels = 32
    config.model.channel_mults = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (7,)  # feature-map sizes (H) with self-attention
    config.model.dropout = 0.1
    config.model.num_groups = 8  # GroupNorm groups
    config.model.downsample_padding = "symmetric"  # stride-2 convs: 'symmetric' (1 px each side) or 'same' (TF's, Ho et al.'s)
    config.model.dtype = "float32"  # 'bfloat16': bf16 activations and matmuls, float32 parameters and loss
    config.model.patch_size = 1  # > 1: the U-Net runs on p x p patches (space-to-depth), e.g. 2 for 28x28 -> 14x14

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3  # the peak, after warm-up
    config.optim.warmup_steps = 0  # linear warm-up from 0
    config.optim.decay = "constant"  # or 'cosine' (to end_lr_factor x the peak at decay_steps)
    config.optim.decay_steps = 0  # 0 = the run's planned steps (train.num_epochs)
    config.optim.end_lr_factor = 0.0
    config.optim.grad_clip_norm = 0.0  # clip the gradient's global norm; 0 = off

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128
    config.train.num_epochs = 20
    config.train.max_steps = 0  # stop after this many steps in total; 0 = no cap
    config.train.max_minutes = 0.0  # stop (and save) before this much wall time has passed; 0 = no limit
    config.train.steps_per_chunk = 50  # steps per host call (lax.scan); does not change results
    config.train.checkpoint_every_steps = 500  # (at the first chunk end past each multiple) plus one at
    # every epoch end and at any early stop
    config.train.keep_checkpoints = 3  # the latest N are kept, and the best by epoch loss
    config.train.sample_every_epochs = 0  # 0 = never; else write a grid of samples every N epochs
    config.train.log_every_steps = 50  # a metrics.jsonl line (loss, lr, grad norm, images/s) at least this often
    # Also write those scalars, the config and sample grids to <workdir>/tensorboard (clu's writer:
    # it imports TensorFlow, ~0.5 GB more memory, so it is off by default on small machines).
    config.train.tensorboard = False
    config.train.sample_every_steps = 0  # 0 = never; else a sample grid (PNG and TensorBoard) every N steps
    config.train.progress = True  # tqdm progress bar
    config.train.ema_decay = 0.0  # 0 = no EMA; else EMA of the parameters, decay min(d, (1 + n) / (10 + n))
    config.train.label_dropout = 0.1  # conditional models: share of labels replaced by 'none' (for guidance)

    config.distributed = ml_collections.ConfigDict()  # several hosts; see README "Scaling out"
    config.distributed.coordinator_address = ""  # e.g. '10.0.0.1:1234'; '' = single host (or JAX_COORDINATOR_ADDRESS)
    config.distributed.num_processes = 0
    config.distributed.process_id = -1

    config.sample = ml_collections.ConfigDict()
    config.sample.sigma = "beta"  # ddpm: 'beta' (the article's) or 'beta_tilde'
    config.sample.num = 100
    config.sample.sampler = "ddpm"  # 'ddpm' (Algorithm 2), 'ddim' (Song et al. 2021) or 'dpmpp_2m' (Lu et al. 2022)
    config.sample.steps = 0  # reverse steps (network evaluations); 0 = all n_steps, fewer = respaced
    config.sample.spacing = "linear"  # how fewer steps are spread: 'linear', 'quadratic' or 'logsnr'
    config.sample.eta = 0.0  # ddim: 0 = deterministic, 1 = DDPM-like noise
    config.sample.clip_x0 = False  # clip the x0 estimate to [-1, 1] at every step
    config.sample.guidance = 0.0  # conditional models: classifier-free guidance weight w (0 = none)
    return config


def unet_config(dataset: str, num_classes: int = 0) -> ml_collections.ConfigDict:
    """base_config() with the residual/attention U-Net (models/unet.py) sized for a CPU, on
    `dataset`: channels 16 at 28x28, 32 at 14x14, 64 at 7x7 (attention at 7x7), 2 res blocks
    per level, dropout 0.1, EMA 0.999; 989,217 parameters unconditional. num_classes > 0
    conditions it on the labels (classifier-free guidance). The configs/*_unet*.py files."""
    config = base_config()
    config.data.name = dataset
    config.model.name = "unet"
    config.model.channels = 16
    config.model.channel_mults = (1, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (7,)
    config.model.num_groups = 8
    config.model.dropout = 0.1
    config.model.num_classes = num_classes
    config.train.ema_decay = 0.999
    return config


def fast_config(dataset: str) -> ml_collections.ConfigDict:
    """Quality per CPU minute (configs/*_fast.py): a U-Net on 2x2 patches (14x14x4 in, widths
    32 at 14x14 and 64 at 7x7, one residual block per level, attention at 7x7) conditioned on
    the dataset's 10 classes, v-prediction with min-SNR-5 weighting, Adam 2e-3 with warm-up,
    cosine decay over 20 epochs and gradient clipping, EMA 0.999, stopped after 55 minutes at
    most (compile included); sampled with DPM-Solver++(2M) in 15 evaluations, one row per class."""
    # The labels cost nothing and halve FID at this budget (README: Results).
    config = unet_config(dataset, num_classes=10)
    config.model.channels = 32
    config.model.channel_mults = (1, 2)
    config.model.num_res_blocks = 1
    config.model.patch_size = 2
    config.model.attention_resolutions = (7,)
    config.model.dropout = 0.0  # a short run underfits: nothing to regularise
    config.diffusion.prediction = "v"
    config.diffusion.loss_weighting = "min_snr"
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 200
    config.optim.grad_clip_norm = 1.0
    # The learning rate decays (cosine, to 0) over 20 epochs, which a 2-vCPU CPU like ours runs
    # in about 48 minutes on a quick day; max_minutes stops a slower one before the rate reaches
    # 0 (on 2026-12-01, at 13 epochs and 29 % of the peak: still FID 7.8, README: Results).
    config.optim.decay = "cosine"
    config.train.num_epochs = 20
    config.train.max_minutes = 55.0
    config.sample.sampler = "dpmpp_2m"
    config.sample.steps = 15
    # Measured on fashion_fast (n = 1000): FID 15.8 with steps even in t, 25.7 even in log-SNR.
    config.sample.spacing = "linear"
    return config


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A config rebuilt from its JSON form (a checkpoint's); fields added to base_config()
    after it was written take their defaults, which reproduce what the older code did."""

    def merge(defaults: dict, values: dict) -> dict:
        out = dict(defaults)
        for key, value in values.items():
            both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
            out[key] = merge(defaults[key], value) if both_dicts else value
        return out

    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _is_resumable(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS)


def run_defining_differences(saved: dict, current: dict) -> list[str]:
    """The run-defining fields whose values differ, as 'name: saved -> current' strings."""
    # Through JSON both ways: the saved config has been (tuples come back as lists).
    a, b = (_flatten(json.loads(json.dumps(c))) for c in (saved, current))
    # A field added after the checkpoint was written means what the older code
    # did exactly when it holds its default: such runs still resume.
    defaults = _flatten(json.loads(json.dumps(base_config().to_dict())))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _is_resumable(key):
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            diffs.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return diffs
