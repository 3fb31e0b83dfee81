"""Model-generic helpers over mask points (the only place splitters learn about layers).

A *masks pytree* is ``{mask_point_name: float array [size]}`` (optionally with leading batch
axes, e.g. ``[N, size]`` for N modules). Kernel counts follow the papers: a mask point gating
several convs (ResCNN's tied shortcut layers) counts once per gated conv, so the counts equal
the physical kernels of an extracted module.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .base import MaskedCNN, MaskPoint

__all__ = [
    "mask_points",
    "ones_masks",
    "total_kernels",
    "kept_kernels",
    "kernel_multiplicity",
    "flatten_masks",
    "count_params",
    "PerUse",
    "effective_masks",
]


def mask_points(model: MaskedCNN) -> tuple[MaskPoint, ...]:
    """Mask points of ``model`` in forward order (name, size, gated layers)."""
    return model.mask_points()


def ones_masks(model: MaskedCNN, batch_shape: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    """All-ones masks ``{name: [*batch_shape, size]}`` (keeps every kernel)."""
    return {p.name: jnp.ones((*batch_shape, p.size), jnp.float32) for p in mask_points(model)}


def kernel_multiplicity(model: MaskedCNN) -> dict[str, int]:
    """How many conv layers each mask point gates (2 for ResCNN's tied points, else 1)."""
    return {p.name: len(p.layers) for p in mask_points(model)}


def total_kernels(model: MaskedCNN) -> int:
    """Conv kernels (output channels) of the whole model, e.g. 4224 for SimCNN at width 1."""
    return int(sum(p.size * len(p.layers) for p in mask_points(model)))


def kept_kernels(model: MaskedCNN, masks: Mapping[str, jax.Array]) -> jax.Array:
    """Kernels kept by ``masks`` (entries > 0), tied points counted per gated layer.

    Accepts batched masks ``[..., size]``; returns an array of the batch shape.
    """
    mult = kernel_multiplicity(model)
    missing = set(mult) - set(masks)
    if missing:
        raise ValueError(f"masks lack mask point(s) {sorted(missing)} of {model.arch}")
    return sum((masks[n] > 0).sum(axis=-1) * mult[n] for n in mult)


def flatten_masks(model: MaskedCNN, masks: Mapping[str, jax.Array], *, tied: bool = True):
    """Concatenate masks in mask-point order into ``[..., K]``.

    With ``tied=True`` tied points are repeated once per gated layer (K = total kernels),
    which is the vector GradSplitter's kernel term averages.
    """
    parts = []
    for p in mask_points(model):
        parts.extend([masks[p.name]] * (len(p.layers) if tied else 1))
    return jnp.concatenate(parts, axis=-1)


def count_params(model: MaskedCNN) -> int:
    """Trainable parameters (conv, BN affine, FC; not BN running statistics)."""
    from flax import nnx

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


class PerUse(Mapping):
    """Masks that apply ``fn`` at every use: ``PerUse(masks, fn)[point]`` is ``fn(masks[point])``,
    computed again at each access. A model reads a mask once per conv it gates, so with a
    straight-through ``fn`` each use gets its own backward (ResCNN's tied pairs: the gradient
    of each conv is clipped on its own, and the clipped gradients add up, as the reference)."""

    def __init__(self, masks: Mapping, fn: Callable):
        self._masks, self._fn = masks, fn

    def __getitem__(self, k):
        return self._fn(self._masks[k])

    def __iter__(self):
        return iter(self._masks)

    def __len__(self):
        return len(self._masks)


def effective_masks(masks: Mapping[str, jax.Array]) -> dict:
    """Binary float32 masks ``[..., C]`` with the keep-one rule applied: a row that keeps no
    kernel keeps channel 0. NumPy in, NumPy out; JAX arrays (traced too) in, JAX out."""
    out = {}
    for k, v in masks.items():
        xp = jnp if isinstance(v, jax.Array) else np
        b = (xp.asarray(v) > 0).astype(xp.float32)
        first = xp.where(b.sum(-1) == 0, 1.0, b[..., 0]).astype(xp.float32)
        out[k] = xp.concatenate([first[..., None], b[..., 1:]], axis=-1)
    return out
