"""A small time-conditioned conv net for tests: the training machinery does not care which model it trains."""

import flax.linen as nn
import jax.numpy as jnp


class TinyEpsNet(nn.Module):
    num_classes: int = 0  # > 0: a label embedding joins the time embedding (label num_classes = none)
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        emb = nn.Dense(8)(jnp.stack([jnp.sin(t / 10.0), jnp.cos(t / 10.0)], -1))
        if self.num_classes:
            emb = emb + nn.Embed(self.num_classes + 1, 8)(jnp.full(t.shape, self.num_classes) if y is None else y)
        emb = nn.Dropout(self.dropout, deterministic=not train)(emb)
        h = nn.silu(nn.Conv(8, (3, 3))(x) + emb[:, None, None, :])
        h = nn.silu(nn.Conv(8, (3, 3))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)
