"""CNNSplitter preprocessing: per-class kernel importance (spec cnnsplitter.md 1a.3).

For class c, the images of class c that the model classifies with ``softmax[c] >= threshold``
(0.9) are kept; a kernel's importance is the mean over them of the sum of its feature map
(``SplittableModel.kernel_maps``: post-ReLU, before pooling; ResCNN's block outputs and residual
sums for tied pairs). Batched, one jitted forward per padded batch (the reference runs batch 1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ...data import normalize, sum_batches
from ...models import SplittableModel

__all__ = ["Importance", "kernel_importance", "importance_order"]


class Importance(NamedTuple):
    """values: ``{point: float [N, C]}`` mean feature-map sums per class; counts: int [N]
    images kept per class (a class without any confident image has importance 0)."""

    values: dict
    counts: np.ndarray


@functools.partial(jax.jit, static_argnames=("threshold",))
def _batch_sums(model, x, y, onehot, valid, threshold):
    maps = model.kernel_maps(x)
    logits = model(x)
    p = jax.nn.softmax(logits, axis=-1)
    keep = (jnp.take_along_axis(p, y[:, None], axis=1)[:, 0] >= threshold).astype(jnp.float32)
    w = onehot * (keep * valid)[:, None]  # [B, N]; padded rows weigh 0
    sums = {k: w.T @ v.sum(axis=(1, 2)) for k, v in maps.items()}  # [N, C]
    return sums, w.sum(0)


def kernel_importance(model: SplittableModel, x_u8: np.ndarray, y: np.ndarray, mean, std, *,
                      threshold: float = 0.9, batch_size: int = 256) -> Importance:
    """Per-class kernel importance from labelled uint8 images (the reference: the 20%
    validation split of the training set)."""
    n = model.num_classes
    if len(x_u8) != len(y):
        raise ValueError(f"{len(x_u8)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= n):
        raise ValueError(f"labels must lie in [0, {n}); got [{y.min()}, {y.max()}]")
    if len(y) == 0:
        raise ValueError("kernel_importance needs at least one image")
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    def batch(xb, yb, valid):
        yb = jnp.asarray(yb, jnp.int32)
        return _batch_sums(model, normalize(jnp.asarray(xb), mean, std), yb, jax.nn.one_hot(yb, n),
                           jnp.asarray(valid), float(threshold))

    totals, counts = sum_batches(batch, [x_u8, y], batch_size)
    values = {k: (v / np.maximum(counts, 1)[:, None]).astype(np.float32) for k, v in totals.items()}
    return Importance(values, counts.astype(np.int64))


def importance_order(imp: Importance) -> dict:
    """``{point: int [N, C]}`` kernel indices by descending importance per class (stable:
    equal importances keep index order)."""
    return {k: np.argsort(-v, axis=1, kind="stable") for k, v in imp.values.items()}
