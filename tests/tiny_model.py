"""A small time-conditioned conv net for tests: the training machinery does not care which model it trains."""

import flax.linen as nn
import jax.numpy as jnp


class TinyEpsNet(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        emb = nn.Dense(8)(jnp.stack([jnp.sin(t / 10.0), jnp.cos(t / 10.0)], -1))
        h = nn.silu(nn.Conv(8, (3, 3))(x) + emb[:, None, None, :])
        h = nn.silu(nn.Conv(8, (3, 3))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)
