"""Checks data parallelism on 4 simulated CPU devices; run by test_parallel.py in a subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before JAX starts)."""

import json
import sys
import tempfile

import jax
import ml_collections
import numpy as np

from tiny_model import TinyEpsNet

from ddpm_jax import checkpoint
from ddpm_jax.config import base_config
from ddpm_jax.parallel import batch_sharding, initialize_distributed, make_mesh, replicated
from ddpm_jax.schedule import linear_beta_schedule
from ddpm_jax.training import _batch, create_optimizer, create_train_state, epoch_permutation, run_keys, train_chunk

BATCH = 8
MODEL = TinyEpsNet()
TX = create_optimizer(ml_collections.ConfigDict({"name": "adam", "learning_rate": 3e-3}))


def train(mesh, scan, steps=4):
    keys = run_keys(jax.random.key(0))
    state = create_train_state(MODEL, linear_beta_schedule(100), TX, keys["init"], (8, 8, 1))
    state = jax.device_put(state, replicated(mesh))
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    images = jax.device_put(images, replicated(mesh))
    order = jax.device_put(epoch_permutation(keys["data"], 0, 64), replicated(mesh))
    split = batch_sharding(mesh) if mesh.size > 1 else None
    state, losses = train_chunk(state, images, order, 0, keys["train"], num_steps=steps, batch_size=BATCH,
                                scan=scan, batch_sharding=split)
    return state, np.asarray(losses["loss"]), images, order


def main():
    assert jax.device_count() == 4, jax.devices()
    mesh4, mesh1 = make_mesh(), make_mesh(jax.devices()[:1])

    # The batch really is split: each of the 4 devices holds 2 of the 8 images.
    _, _, images, order = train(mesh4, scan=False, steps=1)
    x0, _ = jax.jit(_batch, static_argnums=(4, 5))(images, None, order, 0, BATCH, batch_sharding(mesh4))
    assert len(x0.sharding.device_set) == 4 and x0.sharding.shard_shape(x0.shape)[0] == BATCH // 4, x0.sharding
    assert sorted(s.data.shape[0] for s in x0.addressable_shards) == [2, 2, 2, 2]

    # Same global batch and seed: the same losses and parameters as one device.
    for scan in (False, True):
        s4, l4, _, _ = train(mesh4, scan)
        s1, l1, _, _ = train(mesh1, scan)
        np.testing.assert_allclose(l4, l1, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert all(len(p.sharding.device_set) == 4 for p in jax.tree.leaves(s4.params))

    # A checkpoint saved on 4 devices restores on 1 and on 4, with the target's sharding.
    tree = {"params": s4.params, "opt_state": s4.opt_state, "step": s4.step}
    with tempfile.TemporaryDirectory() as workdir:
        manager = checkpoint.open_manager(workdir)
        checkpoint.save(manager, 4, tree, {"config": base_config().to_dict()})
        manager.wait_until_finished()
        for mesh in (mesh1, mesh4):
            target = jax.device_put(tree, replicated(mesh))
            restored, _ = checkpoint.restore(manager, 4, target)
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                assert len(a.sharding.device_set) == mesh.size
        manager.close()
    print("parallel checks passed")


def distributed(process_id: int, port: str) -> None:
    """One of two processes on 127.0.0.1, one CPU device each: prints its losses."""
    config = ml_collections.ConfigDict({"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                                        "process_id": process_id})
    initialize_distributed(config)
    assert jax.process_count() == 2 and jax.device_count() == 2
    _, losses, _, _ = train(make_mesh(), scan=False)
    print("losses", json.dumps(losses.tolist()))


if __name__ == "__main__":
    if len(sys.argv) == 3:  # process id, coordinator port
        distributed(int(sys.argv[1]), sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "single":
        print("losses", json.dumps(train(make_mesh(jax.devices()[:1]), scan=False)[1].tolist()))
    else:
        sys.exit(main())
