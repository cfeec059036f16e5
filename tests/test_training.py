import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tiny_model import TinyEpsNet

from ddpm_jax.data import to_model_range
from ddpm_jax.schedule import linear_beta_schedule
from ddpm_jax.training import (create_optimizer, create_train_state, epoch_permutation, run_keys, train_chunk,
                               train_step)

IMAGE_SHAPE = (8, 8, 1)
BATCH = 8


def synthetic_images(n=64, seed=0):
    """uint8 (n, 8, 8, 1): bright squares at one of four places on a dark background."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, *IMAGE_SHAPE), np.uint8)
    for i, k in enumerate(rng.integers(0, 4, n)):
        r, c = divmod(int(k), 2)
        images[i, 4 * r: 4 * r + 4, 4 * c: 4 * c + 4] = 255
    return images


# One model and optimizer for the whole module: they are static parts of the
# state, so every new instance would be a new program to compile.
MODEL = TinyEpsNet()
TX = create_optimizer(ml_collections.ConfigDict({"name": "adam", "learning_rate": 3e-3}))


def fresh_state(seed=0):
    key = run_keys(jax.random.key(seed))["init"]
    return create_train_state(MODEL, linear_beta_schedule(100, 1e-4, 0.02), TX, key, IMAGE_SHAPE)


def run_chunks(state, images, key, data_key, chunk_sizes, scan=True):
    """Runs the given chunk sizes in order within epoch 0."""
    order = epoch_permutation(data_key, 0, images.shape[0])
    first, losses = 0, []
    for n in chunk_sizes:
        state, chunk_losses = train_chunk(state, images, order, first, key, num_steps=n, batch_size=BATCH, scan=scan)
        first += n
        losses.append(chunk_losses)
    return state, np.concatenate(losses)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(synthetic_images())


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_results_do_not_depend_on_the_chunk_size(images):
    keys = run_keys(jax.random.key(0))
    a, losses_a = run_chunks(fresh_state(), images, keys["train"], keys["data"], [6])
    b, losses_b = run_chunks(fresh_state(), images, keys["train"], keys["data"], [2, 2, 2])
    c, losses_c = run_chunks(fresh_state(), images, keys["train"], keys["data"], [1] * 6)
    # The host loop of jitted steps (the default on CPU) computes the same.
    d, losses_d = run_chunks(fresh_state(), images, keys["train"], keys["data"], [4, 2], scan=False)
    assert int(a.step) == int(b.step) == int(c.step) == int(d.step) == 6
    # Regrouping the scan is exact to the bit (resumed runs on accelerators rely on it)...
    for losses, other in ((losses_b, b), (losses_c, c)):
        np.testing.assert_array_equal(losses_a, losses)
        assert_trees_equal(a.params, other.params)
    # ...and so is regrouping the host loop; the two paths agree to float rounding.
    e, losses_e = run_chunks(fresh_state(), images, keys["train"], keys["data"], [1, 5], scan=False)
    np.testing.assert_array_equal(losses_d, losses_e)
    assert_trees_equal(d.params, e.params)
    np.testing.assert_allclose(losses_a, losses_d, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(d.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_chunk_equals_jitted_train_step_on_the_same_batches(images):
    keys = run_keys(jax.random.key(1))
    chunked, chunk_losses = run_chunks(fresh_state(1), images, keys["train"], keys["data"], [3])
    order = np.asarray(epoch_permutation(keys["data"], 0, images.shape[0]))
    state = fresh_state(1)
    step_losses = []
    for i in range(3):
        x0 = to_model_range(images[order[i * BATCH:(i + 1) * BATCH]])
        state, loss = train_step(state, x0, keys["train"])
        step_losses.append(float(loss))
    np.testing.assert_allclose(chunk_losses, step_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(chunked.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_train_step_compiles_once_and_is_reproducible(images):
    keys = run_keys(jax.random.key(2))
    x0 = to_model_range(images[:BATCH])

    def run(k):
        state = fresh_state(2)
        for _ in range(k):
            state, _ = train_step(state, x0, keys["train"])
        return state

    run(1)
    size = train_step._cache_size()  # after the first step: catches a recompile at step 1
    a, b = run(3), run(3)
    assert train_step._cache_size() == size  # new steps, new params: no recompilation
    assert_trees_equal(a.params, b.params)
    # The step number feeds the randomness: two steps on the same batch draw different t and noise.
    s0 = fresh_state(2)
    _, loss1 = train_step(s0, x0, keys["train"])
    _, loss2 = train_step(s0.replace(step=s0.step + 1), x0, keys["train"])
    assert float(loss1) != float(loss2)


def test_loss_falls_on_synthetic_data(images):
    keys = run_keys(jax.random.key(3))
    state = fresh_state(3)
    losses = []
    for epoch in range(50):  # 8 steps an epoch, 400 steps
        order = epoch_permutation(keys["data"], epoch, images.shape[0])
        state, chunk = train_chunk(state, images, order, 0, keys["train"], num_steps=8, batch_size=BATCH)
        losses.append(np.asarray(chunk))
    losses = np.concatenate(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-80:].mean() < 0.5 * losses[:16].mean(), (losses[:16].mean(), losses[-80:].mean())


def test_epoch_permutation_is_a_seeded_permutation():
    key = run_keys(jax.random.key(0))["data"]
    p0 = np.asarray(epoch_permutation(key, 0, 100))
    assert sorted(p0.tolist()) == list(range(100))
    np.testing.assert_array_equal(p0, epoch_permutation(key, 0, 100))
    assert not np.array_equal(p0, epoch_permutation(key, 1, 100))
