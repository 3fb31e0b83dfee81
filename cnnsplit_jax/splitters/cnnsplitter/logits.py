"""The fitness forward of CNNSplitter: class logits of many masked modules at once
(``modules.forward.masked_logits`` with ``lax.map`` over groups of vmapped modules), computed
once per distinct (class, genome)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ... import mesh as meshlib
from ...data import map_batches
from ...models import SplittableModel
from ...modules.forward import masked_logits

__all__ = ["module_logits", "LogitCache", "LogitStore", "cached_module_logits"]


@functools.partial(jax.jit, static_argnames=("group", "shards"))
def _class_logits(model, masks, classes, x, group, shards=1):
    """[M, B] logit ``classes[m]`` of module m (masks ``{point: [M, C]}``) on images x."""
    logits = masked_logits(model, masks, x, chunk=group, loop="map", shards=shards)  # [M, B, K]
    return jnp.take_along_axis(logits, classes[:, None, None], axis=2)[..., 0]


def module_logits(model: SplittableModel, masks: dict, classes: np.ndarray, x_norm: jax.Array,
                  batch_size: int = 256, group: int = 10, mesh=None) -> np.ndarray:
    """Class logits [M, n] of M masked modules (``{point: [M, C]}``) on normalised images.

    mesh: the M modules (CNNSplitter's class x individual axis) are padded to the mesh's
    ``modules`` axis and split over it; the padding is dropped from the result."""
    m, shards = len(classes), meshlib.axis_size(mesh, "modules")
    if shards > 1:
        to = meshlib.padded(m, mesh)
        masks = meshlib.shard_rows(meshlib.pad_rows(masks, to), mesh)
        classes = meshlib.shard_rows(meshlib.pad_rows(jnp.asarray(classes), to), mesh)
    classes = jnp.asarray(classes)
    out = map_batches(lambda xb: _class_logits(model, masks, classes, xb, group, shards), [x_norm],
                      batch_size, pad=False, axis=1)
    return out[:m]


class LogitCache(NamedTuple):
    """Rows ``[class, binary genome]`` (uint8 [R, 1 + G]) and their logits [R, n]."""

    rows: np.ndarray
    logits: np.ndarray


class LogitStore:
    """Where a host loop keeps the ``LogitCache`` of the last population between generations
    (outside the search state, which stays a pure pytree). ``cache``: None until the first
    generation."""

    def __init__(self):
        self.cache: LogitCache | None = None


def cached_module_logits(model: SplittableModel, masks: dict, rows: np.ndarray, classes: np.ndarray,
                         x_norm: jax.Array, cache: LogitCache | None, group: int = 10,
                         bucket: int = 100, mesh=None) -> tuple[np.ndarray, LogitCache]:
    """``module_logits`` computed once per distinct (class, genome): duplicates in the
    population and individuals already evaluated (``cache``, e.g. the previous generation,
    whose elites survive unchanged) are not recomputed. The number of modules computed is
    padded to a multiple of ``bucket`` (bounded recompiles). Returns (logits [M, n], cache
    of this population)."""
    m = rows.shape[0]
    prev = cache.rows if cache is not None else np.zeros((0, rows.shape[1]), rows.dtype)
    both = np.concatenate([prev, rows])
    _, first, inverse = np.unique(both, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    cur = inverse[len(prev):]
    need = np.unique(cur[first[cur] >= len(prev)])  # distinct rows first seen in this population
    out = np.zeros((m, x_norm.shape[0]), np.float32)
    if need.size:
        rep = first[need] - len(prev)  # a representative current row per distinct genome
        pad = (-len(rep)) % bucket
        sel = np.concatenate([rep, np.repeat(rep[:1], pad)])
        logits = module_logits(model, {k: v[sel] for k, v in masks.items()}, classes[sel], x_norm, group=group,
                               mesh=mesh)
        lut = np.full(len(first), -1)
        lut[need] = np.arange(len(need))
        hit = lut[cur] >= 0
        out[hit] = logits[lut[cur[hit]]]
    cached = first[cur] < len(prev)
    if cached.any():
        out[cached] = cache.logits[first[cur[cached]]]
    return out, LogitCache(rows, out)
