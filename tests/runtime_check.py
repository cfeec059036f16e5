"""Computes the article U-Net's output and parameter gradients on fixed inputs, under
runtime.configure(reexec=True) (which may restart this script), and saves them with the
settings in effect; run by test_runtime.py with DDPM_JAX_CPU_TUNING on and off."""

import os
import sys

from ddpm_jax import runtime

runtime.configure(reexec=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax.models.article_unet import ArticleUNet  # noqa: E402

model = ArticleUNet()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(4, 28, 28, 1)).astype(np.float32))
t = jnp.asarray([0, 1, 500, 999])
params = model.init(jax.random.key(0), x, t)["params"]


def loss(params):
    out = model.apply({"params": params}, x, t)
    return jnp.mean((out - x) ** 2), out


(_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
flat = {"/".join(str(k.key) for k in path): np.asarray(g) for path, g in jax.tree_util.tree_leaves_with_path(grads)}
np.savez(sys.argv[1], out=np.asarray(out), **{f"grad:{k}": v for k, v in flat.items()},
         xla_flags=os.environ.get("XLA_FLAGS", ""), glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
