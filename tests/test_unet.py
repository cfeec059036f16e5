import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.config import base_config
from ddpm_jax.errors import UserError
from ddpm_jax.models import create_model
from ddpm_jax.models.unet import UNet, sinusoidal_embedding

SMALL = dict(channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,), num_groups=4)
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _random_params(model, x, t, y=None, seed=0):
    """Random weights of the right shapes, without compiling model.init.

    Random rather than the real init: the zero-initialised output layers make a fresh
    model output exactly 0 whatever y or the dropout mask, hiding those dependences.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)  # NumPy: jax.random would compile a kernel per shape
    out = []
    for path, leaf in leaves:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        out.append(1 + 0.1 * noise if name == "scale" else 0.1 * noise if name == "bias" else noise / np.sqrt(fan_in))
    return jax.tree.unflatten(tree, out)


def _loss_and_output(model, params, x, t, key):
    out = model.apply({"params": params}, x, t, train=True, rngs={"dropout": key})
    return jnp.mean((out - x) ** 2), out


@pytest.fixture(scope="module")
def uncond():
    """A small unconditional 28x28x1 model: (model, params, x, t, eval apply, train value-and-grad), compiled once."""
    model = UNet(dropout=0.1, image_size=28, **SMALL)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t = jnp.array([0, 977], jnp.int32)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, k: _loss_and_output(model, p, x, t, k), has_aux=True))
    return model, _random_params(model, x, t), x, t, jax.jit(model.apply, static_argnames="train"), grad_fn


@pytest.fixture(scope="module")
def cond():
    """A tiny conditional model on 8x8x1 (3 classes): (model, params, x, t, apply)."""
    model = UNet(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), num_groups=4,
                 dropout=0.0, num_classes=3, image_size=8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([5, 500], jnp.int32)
    return model, _random_params(model, x, t, jnp.zeros((2,), jnp.int32)), x, t, jax.jit(model.apply)


def test_sinusoidal_embedding_matches_closed_form():
    t, dim = np.array([0, 1, 17, 999]), 10
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for i, ti in enumerate(t):
        for k in range(half):
            f = 10000.0 ** (-k / (half - 1))
            expected[i, k], expected[i, half + k] = np.sin(ti * f), np.cos(ti * f)
    np.testing.assert_allclose(sinusoidal_embedding(jnp.asarray(t), dim), expected, atol=2e-4)
    assert sinusoidal_embedding(jnp.asarray(t), 7).shape == (4, 7)


def test_output_shape_28x28(uncond):
    _, params, x, t, apply, _ = uncond
    out = apply({"params": params}, x, t, rngs={"dropout": jax.random.key(0)})
    assert out.shape == x.shape and np.all(np.isfinite(out))


def test_output_shape_32x32x3_four_levels():
    model = UNet(channels=8, channel_mults=(1, 2, 2, 2), num_res_blocks=1, attention_resolutions=(8, 4),
                 num_groups=4, image_size=32)
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)  # traces the whole net, compiles nothing
    assert jax.eval_shape(model.apply, variables, x, t).shape == (1, 32, 32, 3)


def test_dropout_only_in_training(uncond):
    _, params, x, t, apply, grad_fn = uncond
    a, b = (apply({"params": params}, x, t, train=False, rngs={"dropout": jax.random.key(i)}) for i in (0, 1))
    np.testing.assert_array_equal(a, b)
    (_, c), _ = grad_fn(params, jax.random.key(0))
    (_, d), _ = grad_fn(params, jax.random.key(1))
    assert c.shape == x.shape and not np.allclose(c, d, atol=1e-4)


def test_gradients_are_finite(uncond):
    _, params, _, _, _, grad_fn = uncond
    (loss, _), grads = grad_fn(params, jax.random.key(3))
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in leaves)
    assert all(np.any(g != 0) for g in leaves)  # every parameter takes part


def test_unconditional_model_rejects_labels(uncond):
    model, params, x, t, _, _ = uncond
    with pytest.raises(UserError, match="num_classes"):
        model.apply({"params": params}, x, t, jnp.zeros((2,), jnp.int32))


def test_conditional_model_uses_labels(cond):
    _, params, x, t, apply = cond
    out = {y: apply({"params": params}, x, t, jnp.full((2,), y, jnp.int32)) for y in range(4)}
    assert out[0].shape == x.shape and not np.allclose(out[0], out[1], atol=1e-4)
    np.testing.assert_array_equal(apply({"params": params}, x, t, None), out[3])  # None = label num_classes
    assert params["label_emb"]["embedding"].shape == (4, 32)  # num_classes + 1 rows, width 4 * channels


@pytest.mark.parametrize("kwargs, field", [
    (dict(SMALL, channel_mults=(1, 2, 2, 2)), "channel_mults"),  # 7x7 cannot be halved
    (dict(SMALL, num_groups=3), "num_groups"),
    (dict(SMALL, channels=6, channel_mults=(2, 2, 4)), "channels"),  # 12, 12, 24 divide by 4; conv_in's 6 does not
    (dict(SMALL, attention_resolutions=(5,)), "attention_resolutions"),
])
def test_bad_configs_give_user_errors(kwargs, field):
    with pytest.raises(UserError, match=field):
        UNet(image_size=28, **kwargs)
    # Without image_size the same mistake surfaces when the model first sees data.
    with pytest.raises(UserError, match=field):
        jax.eval_shape(UNet(**kwargs).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))


def test_create_model_names_the_fields_of_widths_that_groups_do_not_divide():
    config = base_config()
    config.model.name, config.model.channels, config.model.channel_mults = "unet", 6, (2, 2, 4)
    config.model.num_groups = 4
    with pytest.raises(UserError) as info:
        create_model(config, (28, 28, 1))
    message = str(info.value)
    assert "\n" not in message
    for field in ("--config.model.num_groups", "--config.model.channels", "channel_mults", "6"):
        assert field in message, message


def test_train_py_refuses_groups_that_do_not_divide_the_widths(tmp_path):
    """Through the real CLI (on tfds mock data): one line naming the fields, exit 2."""
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DDPM_JAX_COMPILE_CACHE": "off", "TFDS_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "tests/mock_run.py", "16", "train.py", "--config", "configs/tiny.py",
                             "--config.model.name=unet", "--config.model.channels=6", "--config.model.num_groups=4",
                             f"--workdir={tmp_path / 'w'}"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for words in ("--config.model.num_groups (4)", "--config.model.channels (6)", "channel_mults (6, 12, 12)",
                  "6 is not a multiple"):
        assert words in errors[0], errors[0]


def _param_count(model, y=None):
    x, t = jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32)
    return sum(p.size for p in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0), x, t, y)))


def test_create_model_builds_unet_from_base_config():
    config = base_config()
    config.model.name = "unet"
    model = create_model(config, (28, 28, 1))
    assert isinstance(model, UNet) and model.channel_mults == (1, 2, 2) and model.image_size == 28
    assert _param_count(model) > 0


@pytest.mark.parametrize("name", ["fashion_unet", "mnist_unet", "fashion_unet_cond"])
def test_unet_configs_build(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.model.name == "unet" and config.train.ema_decay == 0.999
    model = create_model(config, (28, 28, 1))
    y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    assert _param_count(model, y) == 989_217 + (11 * 64 if name.endswith("cond") else 0)
