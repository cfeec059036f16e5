"""Work on `n` items in batches of one fixed shape: one compiled program, bounded memory."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def batch_indices(start: int, n: int, batch_size: int) -> np.ndarray:
    """Indices start .. start + batch_size - 1, those past n - 1 replaced by n - 1: (batch_size,) int32."""
    return np.minimum(np.arange(start, start + batch_size), n - 1).astype(np.int32)


def batched(fn: Callable[[np.ndarray], Any], n: int, batch_size: int, *, start: int = 0,
            on_batch: Callable[[int, Any], None] | None = None) -> Any:
    """fn(indices) over items start .. n - 1, `batch_size` at a time, concatenated as numpy arrays.

    fn takes (batch_size,) int32 item indices and returns a pytree of arrays whose
    leading axis has one row per index. The last batch is padded by repeating item
    n - 1, so every call has the same shape; the padded rows are dropped.
    on_batch(end, rows), if given, sees each batch's kept rows as they come (end = the
    index after its last item), e.g. to save progress or update a progress bar.
    Returns the pytree of (n - start, ...) arrays.
    """
    if n - start < 1 or batch_size < 1:
        raise ValueError(f"need at least one item and a batch size >= 1, got {n - start} items, batch {batch_size}")
    parts = []
    for first in range(start, n, batch_size):
        count = min(batch_size, n - first)
        rows = jax.tree.map(lambda a: np.asarray(a)[:count], fn(batch_indices(first, n, batch_size)))
        parts.append(rows)
        if on_batch is not None:
            on_batch(first + count, rows)
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)
