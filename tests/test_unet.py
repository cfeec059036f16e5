import importlib.util
import pathlib

import jax
import jax.extend
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
                             "--config.model.channels=6", "--config.model.num_groups=4",
                             f"--workdir={tmp_path / 'w'}"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for words in ("--config.model.num_groups (4)", "--config.model.channels (6)", "channel_mults (6, 12)",
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


def _load_config(name):
    """configs/<name>.py's get_config()."""
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["fashion_unet", "mnist_unet", "fashion_unet_cond"])
def test_unet_configs_build(name):
    config = _load_config(name)
    assert config.model.name == "unet" and config.train.ema_decay == 0.999
    model = create_model(config, (28, 28, 1))
    y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    assert _param_count(model, y) == 989_217 + (11 * 64 if name.endswith("cond") else 0)


@pytest.mark.parametrize("name", ["fashion_fast", "mnist_fast"])
def test_fast_configs_sample_in_at_most_25_evaluations_and_stop_within_the_hour(name):
    """Issue 12's budget: the default sampler uses at most 25 network evaluations (guidance
    evaluates the network twice a step) and training stops itself before 60 minutes."""
    config = _load_config(name)
    evaluations = config.sample.steps * (2 if config.model.num_classes and config.sample.guidance else 1)
    assert config.sample.sampler == "dpmpp_2m" and 0 < evaluations <= 25
    assert 0 < config.train.max_minutes <= 60
    assert config.data.name == {"fashion_fast": "fashion_mnist", "mnist_fast": "mnist"}[name]


# ------------------------------------------------ Ho et al.'s CIFAR-10 model (configs/cifar10.py)


def _ho_reference_param_count(ch, ch_mult, num_res_blocks, attn_resolutions, size, in_ch):
    """The parameter count of Ho et al.'s diffusion_tf/models/unet.py `model`, tallied layer by
    layer from their code (temb dense0/dense1, conv_in, resnet_block with norm1, conv1, temb_proj,
    norm2, conv2 and a nin_shortcut when the width changes, attn_block with norm, q, k, v,
    proj_out, conv downsample and upsample, norm_out, conv_out), independently of our module."""
    temb = 4 * ch

    def conv3(c_in, c_out):
        return 9 * c_in * c_out + c_out

    def res(c_in, c_out):
        shortcut = c_in * c_out + c_out if c_in != c_out else 0
        return 2 * c_in + conv3(c_in, c_out) + temb * c_out + c_out + 2 * c_out + conv3(c_out, c_out) + shortcut

    def attn(c):
        return 2 * c + 4 * (c * c + c)

    n = ch * temb + temb + temb * temb + temb + conv3(in_ch, ch)
    widths, c, s = [ch], ch, size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            n, c = n + res(c, ch * mult), ch * mult
            n += attn(c) if s in attn_resolutions else 0
            widths.append(c)
        if level != len(ch_mult) - 1:
            n, s = n + conv3(c, c), s // 2
            widths.append(c)
    n += 2 * res(c, c) + attn(c)
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            n, c = n + res(c + widths.pop(), ch * mult), ch * mult
            n += attn(c) if s in attn_resolutions else 0
        if level != 0:
            n, s = n + conv3(c, c), s * 2
    return n + 2 * c + conv3(c, in_ch)


def test_cifar10_config_is_ho_et_als_model_and_recipe():
    config = _load_config("cifar10")
    m = config.model
    assert (config.data.name, config.data.random_flip) == ("cifar10", True)
    assert (m.name, m.channels, tuple(m.channel_mults), m.num_res_blocks, tuple(m.attention_resolutions)) == (
        "unet", 128, (1, 2, 2, 2), 2, (16,))
    assert (m.dropout, m.num_groups, m.downsample_padding, m.dtype, m.num_classes) == (0.1, 32, "same", "float32", 0)
    assert (config.optim.learning_rate, config.optim.warmup_steps, config.optim.grad_clip_norm) == (2e-4, 5000, 1.0)
    assert (config.train.batch_size, config.train.ema_decay, config.train.max_steps) == (128, 0.9999, 800_000)
    assert config.train.num_epochs * (50_000 // 128) >= 800_000  # max_steps, not the epochs, ends the run
    d = config.diffusion
    assert (d.schedule, d.n_steps, d.beta_min, d.beta_max, d.prediction, d.loss_weighting) == (
        "linear", 1000, 1e-4, 0.02, "eps", "none")
    assert (config.sample.sampler, config.sample.steps, config.sample.sigma) == ("ddpm", 0, "beta")
    model = create_model(config, (32, 32, 3))
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)  # traces the 35.7M net, allocates nothing
    count = sum(p.size for p in jax.tree.leaves(shapes))
    # The paper's "35.7M", exactly the count of their code's variables.
    assert count == _ho_reference_param_count(128, (1, 2, 2, 2), 2, (16,), 32, 3) == 35_746_307
    # The same tally reproduces the 28x28 configs' count: the two U-Nets match layer for layer.
    assert _ho_reference_param_count(16, (1, 2, 4), 2, (7,), 28, 1) == 989_217


def test_downsample_padding_same_is_tfs_and_keeps_the_parameters(uncond):
    # TF's SAME pads a stride-2 3x3 conv of an even size by (0, 1); 'symmetric' by (1, 1).
    assert jax.lax.padtype_to_pads((16, 16), (3, 3), (2, 2), "SAME") == [(0, 1), (0, 1)]
    _, params, x, t, apply, _ = uncond
    same = UNet(dropout=0.1, image_size=28, downsample_padding="same", **SMALL)
    same_shapes = jax.eval_shape(same.init, jax.random.key(0), x, t)["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, same_shapes)
    a = apply({"params": params}, x, t)
    b = jax.jit(same.apply)({"params": params}, x, t)
    assert not np.allclose(a, b, atol=1e-3)
    with pytest.raises(UserError, match="downsample_padding"):
        UNet(image_size=28, downsample_padding="valid", **SMALL)


# ------------------------------------------------ bfloat16 computation


def _bf16_config(**model):
    config = base_config()
    config.model.update({"name": "unet", "dtype": "bfloat16", **model})
    return config


def test_bfloat16_output_agrees_with_float32(uncond):
    """Same float32 parameters, bfloat16 computation: float32 output within 2e-2 relative L2 error.
    bfloat16 keeps 8 significant bits, so each rounding errs by up to 2^-9 = 0.2 % (rounding the
    input alone costs 0.16 % in L2); the roundings of activations and weights through ~20 layers
    add up to 1.3 % on this model with random weights (measured), 2e-2 leaves half as much again.
    An error far above 1e-3 says the computation did run in bfloat16."""
    _, params, x, t, apply, _ = uncond
    bf16 = create_model(_bf16_config(dropout=0.1, **SMALL), (28, 28, 1))
    assert bf16.dtype == jnp.bfloat16
    reference = np.asarray(apply({"params": params}, x, t))
    out = jax.jit(bf16.apply)({"params": params}, x, t)
    assert out.dtype == jnp.float32
    error = np.linalg.norm(np.asarray(out) - reference) / np.linalg.norm(reference)
    assert 1e-3 < error < 2e-2, error
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), x, t)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}


def test_bfloat16_convs_and_matmuls_with_float32_norm_statistics_and_softmax(uncond):
    """Which dtype each operation of the bfloat16 model runs in, read off its jaxpr."""
    _, params, x, t, _, _ = uncond
    bf16 = create_model(_bf16_config(dropout=0.1, **SMALL), (28, 28, 1))
    dtypes = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            dtypes.setdefault(eqn.primitive.name, set()).update(str(v.aval.dtype) for v in eqn.outvars)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(jax.make_jaxpr(bf16.apply)({"params": params}, x, t).jaxpr)
    assert dtypes["conv_general_dilated"] == dtypes["dot_general"] == {"bfloat16"}  # attention's two included
    assert dtypes["exp"] == {"float32"}  # the softmax (SiLU is 'logistic')
    assert dtypes["rsqrt"] == {"float32"}  # GroupNorm's 1 / sqrt(var + eps)


def test_model_dtype_errors_are_one_line():
    with pytest.raises(UserError, match="float32, bfloat16") as info:
        create_model(_bf16_config(dtype="float16"), (28, 28, 1))
    assert "\n" not in str(info.value) and "'float16'" in str(info.value)
    config = base_config()
    config.model.dtype = "bfloat16"
    for name in ("article_unet", "article_unet_fixed"):
        config.model.name = name
        with pytest.raises(UserError, match="only by --config.model.name=unet"):
            create_model(config, (28, 28, 1))


def test_one_training_step_at_32x32x3_in_bfloat16_keeps_float32_state():
    """configs/cifar10.py shrunk to a tiny net (one level, no attention: compiling is most of the
    cost), in bfloat16: one train_step gives a finite loss and new parameters, and parameters,
    their EMA and Adam's moments stay float32."""
    from ddpm_jax.schedule import make_schedule
    from ddpm_jax.training import create_optimizer, create_train_state, train_step

    config = _load_config("cifar10")
    config.model.update(channels=4, channel_mults=(1,), num_res_blocks=1, attention_resolutions=(), num_groups=2,
                        dtype="bfloat16")
    config.optim.warmup_steps = 0  # the recipe's warm-up makes step 0's learning rate 0
    model = create_model(config, (32, 32, 3))
    # rbg keys: XLA:CPU compiles threefry's bits for a hundred parameters in tens of seconds, these in a few.
    state = create_train_state(model, make_schedule(config.diffusion), create_optimizer(config.optim),
                               jax.random.key(0, impl="rbg"), (32, 32, 3), ema_decay=config.train.ema_decay)
    x0 = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    new, loss = train_step(state, x0, jax.random.key(2, impl="rbg"))
    assert np.isfinite(float(loss)) and loss.dtype == jnp.float32
    changed = [bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
    assert any(changed)
    # The zero-initialised output conv learns first: nothing upstream gets a gradient through its zero kernel yet.
    assert np.any(np.asarray(new.params["conv_out"]["kernel"]) != 0)
    floats = jax.tree.leaves((new.params, new.ema_params, new.opt_state))
    assert {leaf.dtype for leaf in floats if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype("float32")}
