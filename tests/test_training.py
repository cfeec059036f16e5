import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tiny_model import TinyEpsNet

from ddpm_jax.data import to_model_range
from ddpm_jax.errors import UserError
from ddpm_jax.schedule import linear_beta_schedule
from ddpm_jax.training import (create_optimizer, create_train_state, epoch_permutation, loss_keys, random_flip,
                               run_keys, train_chunk, train_step)

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
        losses.append(chunk_losses["loss"])
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
        losses.append(np.asarray(chunk["loss"]))
    losses = np.concatenate(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-80:].mean() < 0.5 * losses[:16].mean(), (losses[:16].mean(), losses[-80:].mean())


def test_epoch_permutation_is_a_seeded_permutation():
    key = run_keys(jax.random.key(0))["data"]
    p0 = np.asarray(epoch_permutation(key, 0, 100))
    assert sorted(p0.tolist()) == list(range(100))
    np.testing.assert_array_equal(p0, epoch_permutation(key, 0, 100))
    assert not np.array_equal(p0, epoch_permutation(key, 1, 100))


def test_ema_follows_its_warmed_up_formula_and_touches_only_params(images):
    keys = run_keys(jax.random.key(4))
    key = keys["init"]
    state = create_train_state(MODEL, linear_beta_schedule(100, 1e-4, 0.02), TX, key, IMAGE_SHAPE, ema_decay=0.9)
    assert_trees_equal(state.ema_params, state.params)
    plain = fresh_state(4)  # the same init key: the same parameters, no EMA
    assert plain.ema_params is None
    order = epoch_permutation(keys["data"], 0, images.shape[0])
    expected = jax.tree.map(np.asarray, state.params)  # copies: train_chunk donates the state's buffers
    for i in range(4):
        state, _ = train_chunk(state, images, order, i, keys["train"], num_steps=1, batch_size=BATCH)
        plain, _ = train_chunk(plain, images, order, i, keys["train"], num_steps=1, batch_size=BATCH)
        decay = min(0.9, (1 + (i + 1)) / (10 + (i + 1)))  # warm-up: 2/11, 3/12, 4/13, 5/14
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.asarray(p), expected, state.params)
    # The EMA does not change training itself...
    assert_trees_equal(state.params, plain.params)
    assert_trees_equal(state.opt_state, plain.opt_state)
    # ...and is the warmed-up average of the parameters.
    for x, y in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(state.ema_params)[0], jax.tree.leaves(state.params)[0])
    with pytest.raises(UserError):
        create_train_state(MODEL, linear_beta_schedule(100), TX, key, IMAGE_SHAPE, ema_decay=1.0)


def test_conditional_training_uses_labels_and_drops_some(images):
    model = TinyEpsNet(num_classes=4)
    keys = run_keys(jax.random.key(5))
    labels = jnp.asarray(np.arange(images.shape[0]) % 4, jnp.int32)
    order = epoch_permutation(keys["data"], 0, images.shape[0])

    def train(label_dropout, labels_used):
        state = create_train_state(model, linear_beta_schedule(100), TX, keys["init"], IMAGE_SHAPE, num_classes=4,
                                   label_dropout=label_dropout)
        state, metrics = train_chunk(state, images, order, 0, keys["train"], num_steps=3, batch_size=BATCH,
                                     labels=labels_used, scan=False)
        return state, metrics["loss"]

    a, losses_a = train(0.0, labels)
    b, losses_b = train(0.0, (labels + 1) % 4)
    c, losses_c = train(1.0, labels)  # every label dropped: the labels no longer matter
    d, losses_d = train(1.0, (labels + 1) % 4)
    assert not np.allclose(losses_a, losses_b)
    np.testing.assert_array_equal(losses_c, losses_d)
    embedding = c.params["Embed_0"]["embedding"]
    # With every label dropped only the 'none' row (index 4) is trained.
    initial = create_train_state(model, linear_beta_schedule(100), TX, keys["init"], IMAGE_SHAPE,
                                 num_classes=4).params["Embed_0"]["embedding"]
    np.testing.assert_array_equal(embedding[:4], initial[:4])
    assert not np.allclose(embedding[4], initial[4])
    with pytest.raises(UserError):
        train_chunk(a, images, order, 0, keys["train"], num_steps=1, batch_size=BATCH)  # labels missing


def test_compile_train_chunk_compiles_what_train_chunk_then_runs(images):
    """run.py compiles the first chunk ahead (to release the compiler's memory before stepping);
    the chunk must then find its program compiled, not build another."""
    from ddpm_jax.training import compile_train_chunk

    compiles = []

    def listener(name, seconds, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    state = fresh_state(3)
    keys = run_keys(jax.random.key(3))
    order = epoch_permutation(keys["data"], 0, images.shape[0])
    jnp.stack([jnp.zeros(())] * 3)  # the host loop stacks its 3 losses: compile that first
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for scan in (False, True):
            # batch 4 and 3 steps: shapes no other test compiles
            compile_train_chunk(state, images, order, keys["train"], num_steps=3, batch_size=4, scan=scan)
            assert compiles, "compile_train_chunk compiled nothing"
            compiles.clear()
            state, _ = train_chunk(state, images, order, 0, keys["train"], num_steps=3, batch_size=4, scan=scan)
            assert not compiles, f"train_chunk(scan={scan}) compiled again"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_a_steps_random_streams_are_pairwise_distinct():
    key = jax.random.fold_in(run_keys(jax.random.key(0))["train"], 7)
    streams = loss_keys(key)
    # t and noise are split(key) as before (the article model's draws are unchanged) ...
    t_key, noise_key = jax.random.split(key)
    assert np.array_equal(jax.random.key_data(streams["t"]), jax.random.key_data(t_key))
    assert np.array_equal(jax.random.key_data(streams["noise"]), jax.random.key_data(noise_key))
    # ... and no stream is another's key, nor a key that splitting another yields.
    derived = dict(streams)
    for name, k in streams.items():
        for i, child in enumerate(jax.random.split(k)):
            derived[f"split({name})[{i}]"] = child
    data = {name: tuple(np.asarray(jax.random.key_data(k)).tolist()) for name, k in derived.items()}
    for name in streams:
        clashes = [other for other in data if other != name and data[other] == data[name]]
        assert not clashes, (name, clashes)


def test_learning_rate_warm_up_cosine_decay_and_clipping():
    from ddpm_jax.training import learning_rate, learning_rate_at

    def optim(**kw):
        return ml_collections.ConfigDict({"name": "adam", "learning_rate": 2e-3, **kw})

    assert learning_rate(optim()) == 2e-3  # constant: a float, so the article's optimizer state is unchanged
    warm = learning_rate(optim(warmup_steps=10))
    assert [learning_rate_at(warm, s) for s in (0, 5, 10, 500)] == pytest.approx([0, 1e-3, 2e-3, 2e-3])
    cosine = learning_rate(optim(warmup_steps=10, decay="cosine", end_lr_factor=0.1), total_steps=110)
    # Half-way through the decay: the mean of peak and end; at its end: the end value.
    assert [learning_rate_at(cosine, s) for s in (10, 60, 110)] == pytest.approx([2e-3, 1.1e-3, 2e-4])
    for bad in (dict(learning_rate=0.0), dict(learning_rate=-1e-3), dict(warmup_steps=-1), dict(decay="step"),
                dict(decay="cosine", warmup_steps=200)):
        with pytest.raises(UserError):
            create_optimizer(optim(**bad), total_steps=100)
    # Clipping by global norm: a huge gradient moves Adam's first moment by at most the clip norm.
    tx = create_optimizer(optim(grad_clip_norm=1.0))
    params = {"w": jnp.zeros(4)}
    _, opt_state = tx.update({"w": jnp.full(4, 1e6)}, tx.init(params), params)
    first_moment = opt_state[1][0].mu["w"]
    np.testing.assert_allclose(np.linalg.norm(first_moment), 0.1 * 1.0, rtol=1e-5)  # (1 - b1) * clipped norm


def test_random_flip_mirrors_some_images_left_right(images):
    x = np.asarray(images[:BATCH])
    out = np.asarray(random_flip(jnp.asarray(x), jax.random.key(0)))
    flipped = [not np.array_equal(o, i) for o, i in zip(out, x)]  # no image here is left-right symmetric
    assert 0 < sum(flipped) < BATCH
    for o, i, f in zip(out, x, flipped):
        np.testing.assert_array_equal(o, i[:, ::-1] if f else i)  # axis 2 of NHWC: W


def test_a_step_with_flips_trains_on_its_keys_flipped_batch(images):
    """The step draws its flips from its own key (step 0 here); with the chosen images flipped
    by hand, the step without flips computes exactly the same."""
    keys = run_keys(jax.random.key(6))
    flips = create_train_state(MODEL, linear_beta_schedule(100, 1e-4, 0.02), TX, keys["init"], IMAGE_SHAPE,
                               random_flip=True)
    order = epoch_permutation(keys["data"], 0, images.shape[0])
    batch = np.asarray(images)[np.asarray(order[:BATCH])]
    by_hand = np.asarray(random_flip(jnp.asarray(batch), loss_keys(jax.random.fold_in(keys["train"], 0))["flip"]))
    assert not np.array_equal(by_hand, batch)
    flipped, flipped_loss = train_chunk(flips, images, order, 0, keys["train"], num_steps=1, batch_size=BATCH)
    manual, manual_loss = train_chunk(fresh_state(6), jnp.asarray(by_hand), jnp.arange(BATCH), 0, keys["train"],
                                      num_steps=1, batch_size=BATCH)
    _, plain_loss = train_chunk(fresh_state(6), images, order, 0, keys["train"], num_steps=1, batch_size=BATCH)
    np.testing.assert_array_equal(flipped_loss["loss"], manual_loss["loss"])
    assert_trees_equal(flipped.params, manual.params)
    assert float(flipped_loss["loss"][0]) != float(plain_loss["loss"][0])
