import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import ArticleUNet, article_sinusoidal_table

# An rbg key: XLA:CPU compiles threefry's random bits for each of the article model's 172
# parameters slowly (about 3x the whole init with rbg); these tests need an init, not that stream.
INIT_KEY = jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def model_and_params():
    model = ArticleUNet(n_steps=1000, time_emb_dim=100)
    variables = model.init(INIT_KEY, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
    return model, variables


@pytest.fixture(scope="module")
def apply(model_and_params):
    model, _ = model_and_params
    return jax.jit(model.apply)


def test_time_table_matches_the_articles_formula():
    # A literal NumPy transcription of the article's sinusoidal_embedding(n, d).
    n, d = 1000, 100
    wk = np.array([1 / 10_000 ** (2 * j / d) for j in range(d)]).reshape(1, d)
    t = np.arange(n).reshape(n, 1)
    expected = np.zeros((n, d))
    expected[:, ::2] = np.sin(t * wk[:, ::2])
    expected[:, 1::2] = np.cos(t * wk[:, ::2])
    np.testing.assert_allclose(article_sinusoidal_table(n, d), expected, atol=1e-6)


def test_trainable_parameter_count_is_the_articles(model_and_params):
    _, variables = model_and_params
    assert list(variables) == ["params"]  # the time table is a constant, not a variable
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 506_852


def test_layer_shapes_follow_the_article(model_and_params):
    params = model_and_params[1]["params"]
    assert params["b1_0"]["LayerNorm_0"]["scale"].shape == (28, 28, 1)
    assert params["b_mid_0"]["LayerNorm_0"]["scale"].shape == (3, 3, 40)
    assert params["b4_0"]["Conv_0"]["kernel"].shape == (3, 3, 80, 40)
    assert params["b_out_0"]["Conv_0"]["kernel"].shape == (3, 3, 20, 10)
    assert params["down3_a"]["kernel"].shape == (2, 2, 40, 40)
    assert params["up1_b"]["kernel"].shape == (2, 2, 40, 40)
    assert params["te_b4"]["Dense_0"]["kernel"].shape == (100, 80)
    assert params["te_b1"]["Dense_1"]["kernel"].shape == (1, 1)
    # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    bound = 1 / np.sqrt(80 * 9)
    w = np.asarray(params["b4_0"]["Conv_0"]["kernel"])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


def test_output_shape_and_time_dependence(model_and_params, apply):
    _, variables = model_and_params
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    out_a = apply(variables, x, jnp.array([0, 10, 500, 999]))
    out_b = apply(variables, x, jnp.array([999, 10, 500, 0]))
    assert out_a.shape == x.shape
    assert np.all(np.isfinite(out_a))
    assert not np.allclose(out_a[0], out_b[0], atol=1e-5)  # t changes the output
    np.testing.assert_allclose(out_a[1:3], out_b[1:3], atol=1e-5)  # per-sample: the batch does not mix


def test_blind_to_global_offset_and_scale(model_and_params, apply):
    # The first LayerNorm normalises over (H, W, C): it removes the image's mean
    # and scale (and the time embedding added just before it), so
    # f(a x + c, t) = f(x, t) for a > 0 -- a property of the article's model.
    _, variables = model_and_params
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    t = jnp.array([3, 100, 600, 999])
    a = jnp.array([0.5, 3.0, 1.0, 7.0]).reshape(4, 1, 1, 1)
    c = jnp.array([5.0, -2.0, 0.3, 10.0]).reshape(4, 1, 1, 1)
    base = apply(variables, x, t)
    moved = apply(variables, a * x + c, t)
    np.testing.assert_allclose(moved, base, atol=2e-4, rtol=1e-3)
    # ...while a non-affine change of the input does change the output.
    assert not np.allclose(apply(variables, x ** 3, t), base, atol=1e-3)


def test_last_blocks_unused_layernorm_gets_no_gradient(model_and_params):
    # The article builds a LayerNorm in its last block and never applies it:
    # its parameters count but stay at their initial values.
    model, variables = model_and_params
    x = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))

    def loss(params):
        return jnp.mean(model.apply({"params": params}, x, jnp.array([1, 2])) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])  # one compile: op by op is ~3x slower
    unused = grads["b_out_2"]["LayerNorm_0"]
    assert float(jnp.abs(unused["scale"]).max()) == 0.0 and float(jnp.abs(unused["bias"]).max()) == 0.0
    assert float(jnp.abs(grads["b_out_1"]["LayerNorm_0"]["scale"]).max()) > 0


def test_the_one_change_fix_sees_brightness_and_contrast():
    # article_unet_fixed normalises the first conv's output instead of the image:
    # offset and scale of the input now reach the network. Only that block differs.
    fixed = ArticleUNet(n_steps=1000, time_emb_dim=100, normalize_input=False)
    variables = fixed.init(INIT_KEY, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32))
    params = variables["params"]
    assert sum(p.size for p in jax.tree.leaves(params)) == 506_852 - 2 * 28 * 28 * 1 + 2 * 28 * 28 * 10
    assert params["b1_0"]["LayerNorm_0"]["scale"].shape == (28, 28, 10)
    x = jax.random.normal(jax.random.key(2), (2, 28, 28, 1))
    t = jnp.array([100, 600])
    base = fixed.apply(variables, x, t)
    assert not np.allclose(fixed.apply(variables, x + 1.0, t), base, atol=1e-3)
    assert not np.allclose(fixed.apply(variables, 2.0 * x, t), base, atol=1e-3)


def _assert_same_function(direct, ours, x):
    """Same parameters and init, same outputs and gradients (to float32 rounding)."""
    variables = direct.init(jax.random.key(5), x)
    own_init = ours.init(jax.random.key(5), x)
    assert jax.tree.structure(own_init) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(own_init), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    target = jax.random.normal(jax.random.key(6), direct.apply(variables, x).shape)

    def loss_and_grads(module):
        loss = lambda v, x: jnp.sum((module.apply(v, x) - target) ** 2)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(variables, x)

    (want, want_grads), (got, got_grads) = loss_and_grads(direct), loss_and_grads(ours)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("kernel, strides, padding, size, channels", [
    (4, 2, ((1, 1), (1, 1)), 28, 10), (4, 2, ((1, 1), (1, 1)), 6, 40),  # the article's Conv2d(4, 2, 1)
    (3, 2, ((1, 1), (1, 1)), 14, 32), (3, 2, "SAME", 14, 32),  # unet's downsampling, both paddings
    (3, 2, "SAME", 7, 8), (3, 2, ((0, 2), (1, 0)), 9, 4), (2, 2, "VALID", 5, 3),  # odd sizes, uneven pads
    (3, 1, "SAME", 7, 8), (2, 1, "VALID", 5, 3), (3, 1, ((0, 2), (1, 0)), 9, 4)])  # stride 1; uneven: lax's
def test_fast_conv_equals_lax(kernel, strides, padding, size, channels):
    # Inside nn.Conv: the same module, parameters and init, the same function and gradients as
    # lax's convolution; stride 2 computed at stride 1 (space to depth), stride 1 in the CPU kernel.
    from ddpm_jax.models import cpu_kernels
    from ddpm_jax.models.convs import fast_conv

    conv = functools.partial(nn.Conv, channels + 1, (kernel, kernel), (strides, strides), padding=padding)
    direct, ours = conv(), conv(conv_general_dilated=fast_conv)
    x = jax.random.normal(jax.random.key(4), (2, size, size, channels))
    _assert_same_function(direct, ours, x)
    variables = direct.init(jax.random.key(5), x)
    jaxprs = [str(jax.make_jaxpr(m.apply)(variables, x)) for m in (direct, ours)]
    assert [j.count("window_strides=(2, 2)") for j in jaxprs] == [int(strides == 2), 0]  # no strided one left
    if jax.default_backend() == "cpu" and cpu_kernels.available():
        # lax's: uneven padding at stride 1, and a 1 x 1 phase kernel (cpu_kernels._kernel_pays)
        uneven = strides == 1 and not isinstance(padding, str) and padding[0] != padding[1]
        assert (cpu_kernels._CONV in jaxprs[1]) == (not uneven and not (kernel, strides) == (2, 2))


def _flax_conv_transpose(features: int, kernel: int, stride: int, padding: int) -> nn.ConvTranspose:
    """PyTorch's ConvTranspose2d(kernel, stride, padding) with its init, as nn.ConvTranspose runs it
    (lax.conv_transpose pads the stride-dilated input by k - 1 - p; PyTorch's fan_in is the output's)."""
    from ddpm_jax.models import article_unet

    pad = kernel - 1 - padding
    init = article_unet._torch_uniform(features * kernel * kernel)
    return nn.ConvTranspose(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                            transpose_kernel=True, kernel_init=init, bias_init=init)


@pytest.mark.parametrize("size, channels", [(7, 20), (3, 40)])
def test_stride_two_transposed_conv_equals_the_input_dilated_form(size, channels):
    # The up path's ConvTranspose2d(4, 2, 1) as one stride-1 3x3 convolution over the four
    # output phases: same parameters, same init, same function and gradients.
    from ddpm_jax.models import article_unet

    x = jax.random.normal(jax.random.key(4), (2, size, size, channels))
    _assert_same_function(_flax_conv_transpose(channels, 4, 2, 1), article_unet.StrideTwoConvTranspose(channels), x)


@pytest.mark.parametrize("kernel, padding", [(2, 0), (3, 1), (3, 0)])
def test_stride_one_transposed_conv_is_nn_conv_transpose(kernel, padding):
    # up1_b's ConvTranspose2d(2, 1, 0) as a convolution with the flipped kernel (cpu_kernels.conv):
    # nn.ConvTranspose's parameters and init, the same function and gradients.
    from ddpm_jax.models import article_unet

    x = jax.random.normal(jax.random.key(4), (2, 6, 6, 12))
    _assert_same_function(_flax_conv_transpose(20, kernel, 1, padding),
                          article_unet.StrideOneConvTranspose(20, kernel, padding), x)


@pytest.mark.parametrize("kernel, strides, padding, silu", [(3, 1, 1, True), (4, 2, 1, False), (2, 1, 0, True)])
def test_article_conv_is_nn_conv_and_its_silu_fused(kernel, strides, padding, silu):
    # The article U-Net's Conv: nn.Conv's parameters, names and init (PyTorch's), and with
    # silu=True the bias and SiLU in one kernel: the same function and gradients as nn.Conv -> SiLU.
    from ddpm_jax.models import article_unet

    init = article_unet._torch_uniform(10 * kernel * kernel)

    class Direct(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(20, (kernel, kernel), strides, padding=((padding, padding),) * 2, kernel_init=init,
                        bias_init=init)(x)
            return jax.nn.silu(y) if silu else y

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return article_unet.Conv(20, kernel, strides, padding, silu=silu)(x)

    _assert_same_function(Direct(), Ours(), jax.random.normal(jax.random.key(4), (2, 14, 14, 10)))


# ------------------------------------------------ numerical parity with the article's PyTorch model

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
_TORCH_LEVELS = {"b1": "b1", "b2": "b2", "b3": "b3", "mid": "b_mid", "b4": "b4", "b5": "b5", "b_out": "b_out"}
_TORCH_LAYERS = {"down1": "down1", "down2": "down2", "down3.0": "down3_a", "down3.2": "down3_b",
                 "up1.0": "up1_a", "up1.2": "up1_b", "up2": "up2", "up3": "up3", "conv_out": "conv_out"}


def _flax_place(torch_name):
    """PyTorch parameter name -> (flax param path, the transpose from PyTorch's layout to flax's)."""
    parts = torch_name.split(".")
    kind = parts[-1]
    if parts[0] == "te":  # te.<level>.<0|2>.<weight|bias>: Linear (out, in) -> Dense kernel (in, out)
        level = list(_TORCH_LEVELS.values())[int(parts[1])]
        dense = {"0": "Dense_0", "2": "Dense_1"}[parts[2]]
        return (f"te_{level}", dense, "kernel" if kind == "weight" else "bias"), (1, 0)
    if parts[0] in _TORCH_LEVELS and parts[1].isdigit():  # <level>.<i>.<norm|conv1|conv2>.<weight|bias>
        block = f"{_TORCH_LEVELS[parts[0]]}_{parts[1]}"
        if parts[2] == "norm":  # LayerNorm over (C, H, W) -> (H, W, C)
            return (block, "LayerNorm_0", "scale" if kind == "weight" else "bias"), (1, 2, 0)
        conv = {"conv1": "Conv_0", "conv2": "Conv_1"}[parts[2]]
        return (block, conv, "kernel" if kind == "weight" else "bias"), (2, 3, 1, 0)
    # Conv2d OIHW -> HWIO; ConvTranspose2d (in, out, kH, kW) -> (kH, kW, out, in), the forward
    # conv's HWIO that flax's ConvTranspose(transpose_kernel=True) takes.
    layer = _TORCH_LAYERS[".".join(parts[:-1])]
    return (layer, "kernel" if kind == "weight" else "bias"), (2, 3, 1, 0)


def _golden_params(names, shapes):
    """The golden file's formula weights in flax's layout: {'params': ...} shaped like `shapes`."""
    spec = importlib.util.spec_from_file_location("make_article_golden", os.path.join(GOLDEN, "make_article_golden.py"))
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)  # imports no torch: only main() needs it
    formula = maker.formula

    params = jax.tree.map(lambda _: None, shapes)
    for k, name in enumerate(names):
        path, perm = _flax_place(name)
        leaf = shapes
        for key in path:
            leaf = leaf[key]
        torch_shape = tuple(leaf.shape[i] for i in np.argsort(perm)) if len(leaf.shape) > 1 else leaf.shape
        value = formula(torch_shape, k, name.endswith("norm.weight"))
        value = value.transpose(perm) if value.ndim > 1 else value
        assert value.shape == leaf.shape, name
        node = params
        for key in path[:-1]:
            node = node[key]
        assert node[path[-1]] is None, f"{name} maps onto a parameter already set"
        node[path[-1]] = jnp.asarray(value)
    assert all(leaf is not None for leaf in jax.tree.leaves(params, is_leaf=lambda v: v is None))
    return params


def test_matches_the_articles_pytorch_model_numerically(model_and_params, apply):
    """Same formula weights, same input and timesteps: the flax model's output equals the
    PyTorch model's (tests/golden/make_article_golden.py, torch 2.13.0) within 2e-5 absolute
    (the output's std is 0.15; the float32 difference measured 3.6e-6 here). One kernel
    transposed, or a LayerNorm's (H, W) axes swapped, misses by orders of magnitude more."""
    golden = np.load(os.path.join(GOLDEN, "article_unet_torch.npz"))
    names = [str(n) for n in golden["names"]]
    assert len(names) == 172
    shapes = model_and_params[1]["params"]
    params = _golden_params(names, shapes)
    x = jnp.asarray(golden["x_times_64"].astype(np.float32).transpose(0, 2, 3, 1) / 64)  # NCHW -> NHWC
    expected = golden["out"].transpose(0, 2, 3, 1)
    out = np.asarray(apply({"params": params}, x, jnp.asarray(golden["t"])))
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)

    wrong = jax.tree.map(lambda a: a, params)
    wrong["b2_1"]["Conv_0"]["kernel"] = params["b2_1"]["Conv_0"]["kernel"].transpose(1, 0, 2, 3)  # H <-> W
    assert np.abs(np.asarray(apply({"params": wrong}, x, jnp.asarray(golden["t"]))) - expected).max() > 1e-3
    wrong = jax.tree.map(lambda a: a, params)
    wrong["up2"]["kernel"] = params["up2"]["kernel"].transpose(0, 1, 3, 2)  # in <-> out channels
    assert np.abs(np.asarray(apply({"params": wrong}, x, jnp.asarray(golden["t"]))) - expected).max() > 1e-3
    wrong = jax.tree.map(lambda a: a, params)
    wrong["b3_0"]["LayerNorm_0"]["scale"] = params["b3_0"]["LayerNorm_0"]["scale"].transpose(1, 0, 2)
    assert np.abs(np.asarray(apply({"params": wrong}, x, jnp.asarray(golden["t"]))) - expected).max() > 1e-3
