import subprocess
import sys

import ddpm_jax
from ddpm_jax.config import base_config, run_defining_differences


def test_every_top_level_name_resolves():
    for name in ddpm_jax.__all__:
        assert getattr(ddpm_jax, name) is not None, name


def test_importing_the_package_is_cheap():
    code = "import sys, ddpm_jax; print('jax' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_run_defining_fields():
    saved = base_config().to_dict()
    current = base_config()
    current.train.num_epochs = 99
    current.train.max_steps = 7
    current.data.manual_dir = "/somewhere"
    assert run_defining_differences(saved, current.to_dict()) == []
    current.seed = 1
    current.model.time_emb_dim = 64
    assert run_defining_differences(saved, current.to_dict()) == ["model.time_emb_dim: 100 -> 64", "seed: 0 -> 1"]


def test_fields_a_checkpoint_predates_take_their_defaults():
    from ddpm_jax.config import config_from_dict

    saved = base_config().to_dict()
    del saved["train"]["ema_decay"], saved["model"]["num_classes"], saved["sample"]["sampler"]
    # An older run resumes: the new fields at their defaults do what the old code did...
    assert run_defining_differences(saved, base_config().to_dict()) == []
    # ...but not with a setting the old code did not have.
    current = base_config()
    current.train.ema_decay = 0.999
    assert run_defining_differences(saved, current.to_dict()) == ["train.ema_decay: '<missing>' -> 0.999"]
    config = config_from_dict(saved)
    assert config.train.ema_decay == 0.0 and config.sample.sampler == "ddpm" and config.model.num_classes == 0
