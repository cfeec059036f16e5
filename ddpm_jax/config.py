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
    "train.steps_per_chunk",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.sample_every_epochs",
    "train.progress",
    "data.data_dir",
    "data.manual_dir",
    "sample",
    "distributed",
})


def base_config() -> ml_collections.ConfigDict:
    """The article's settings (Fashion-MNIST, T=1000, linear betas 1e-4..0.02, batch 128, Adam 1e-3, 20 epochs)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "fashion_mnist"  # tfds name: 'fashion_mnist' or 'mnist'
    config.data.data_dir = ""  # tfds data_dir; '' = tfds' default (~/tensorflow_datasets)
    config.data.manual_dir = ""  # folder with the official .gz archives, for machines without internet

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "linear"  # or 'cosine' (Nichol & Dhariwal 2021; ignores beta_min/beta_max)
    config.diffusion.n_steps = 1000
    config.diffusion.beta_min = 1e-4
    config.diffusion.beta_max = 0.02

    config.model = ml_collections.ConfigDict()
    config.model.name = "article_unet"
    config.model.time_emb_dim = 100

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128
    config.train.num_epochs = 20
    config.train.max_steps = 0  # stop after this many steps in total; 0 = no cap
    config.train.steps_per_chunk = 50  # steps per host call (lax.scan); does not change results
    config.train.checkpoint_every_steps = 500  # (at the first chunk end past each multiple) plus one at
    # every epoch end and at any early stop
    config.train.keep_checkpoints = 3  # the latest N are kept, and the best by epoch loss
    config.train.sample_every_epochs = 0  # 0 = never; else write a grid of samples every N epochs
    config.train.progress = True  # tqdm progress bar

    config.distributed = ml_collections.ConfigDict()  # several hosts; see README "Scaling out"
    config.distributed.coordinator_address = ""  # e.g. '10.0.0.1:1234'; '' = single host (or JAX_COORDINATOR_ADDRESS)
    config.distributed.num_processes = 0
    config.distributed.process_id = -1

    config.sample = ml_collections.ConfigDict()
    config.sample.sigma = "beta"  # 'beta' (the article's) or 'beta_tilde'
    config.sample.num = 100
    return config


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
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _is_resumable(key):
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            diffs.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return diffs
