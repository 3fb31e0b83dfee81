"""CNNSplitter preprocessing: per-class kernel importance (spec cnnsplitter.md 1a.3).

For class c, the images of class c that the model classifies with ``softmax[c] >= threshold``
(0.9) are kept; a kernel's importance is the mean over them of the sum of its feature map
(``MaskedCNN.kernel_maps``: post-ReLU, before pooling; ResCNN's block outputs and residual
sums for tied pairs). Batched, one jitted forward per batch (the reference runs batch 1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .data import normalize
from .models import MaskedCNN

__all__ = ["Importance", "kernel_importance", "importance_order"]


class Importance(NamedTuple):
    """values: ``{point: float [N, C]}`` mean feature-map sums per class; counts: int [N]
    images kept per class (a class without any confident image has importance 0)."""

    values: dict
    counts: np.ndarray


@functools.partial(jax.jit, static_argnames=("threshold",))
def _batch_sums(model, x, y, onehot, threshold):
    maps = model.kernel_maps(x)
    logits = model(x)
    p = jax.nn.softmax(logits, axis=-1)
    keep = (jnp.take_along_axis(p, y[:, None], axis=1)[:, 0] >= threshold).astype(jnp.float32)
    w = onehot * keep[:, None]  # [B, N]
    sums = {k: w.T @ v.sum(axis=(1, 2)) for k, v in maps.items()}  # [N, C]
    return sums, w.sum(0)


def kernel_importance(model: MaskedCNN, x_u8: np.ndarray, y: np.ndarray, mean, std, *,
                      threshold: float = 0.9, batch_size: int = 256) -> Importance:
    """Per-class kernel importance from labelled uint8 images (the reference: the 20%
    validation split of the training set)."""
    n = model.num_classes
    if len(x_u8) != len(y):
        raise ValueError(f"{len(x_u8)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= n):
        raise ValueError(f"labels must lie in [0, {n}); got [{y.min()}, {y.max()}]")
    mean, std = jnp.asarray(mean), jnp.asarray(std)
    totals, counts = None, np.zeros(n)
    for i in range(0, len(y), batch_size):
        xb = normalize(jnp.asarray(x_u8[i : i + batch_size]), mean, std)
        yb = jnp.asarray(y[i : i + batch_size], jnp.int32)
        sums, cnt = _batch_sums(model, xb, yb, jax.nn.one_hot(yb, n), float(threshold))
        sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
        counts += np.asarray(cnt)
    if totals is None:
        raise ValueError("kernel_importance needs at least one image")
    values = {k: (v / np.maximum(counts, 1)[:, None]).astype(np.float32) for k, v in totals.items()}
    return Importance(values, counts.astype(np.int64))


def importance_order(imp: Importance) -> dict:
    """``{point: int [N, C]}`` kernel indices by descending importance per class (stable:
    equal importances keep index order)."""
    return {k: np.argsort(-v, axis=1, kind="stable") for k, v in imp.values.items()}
