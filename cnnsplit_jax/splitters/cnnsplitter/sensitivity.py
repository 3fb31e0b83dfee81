"""CNNSplitter preprocessing: layer sensitivity (spec cnnsplitter.md 1a.4) and the automatic
rule that turns it into the set of sensitive layers."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ...models import mask_points
from ...models.protocol import SplittableModel
from ...models import effective_masks
from .logits import module_logits

__all__ = ["RATIOS", "layer_sensitivity", "sensitive_layers"]

#: kept fractions of a layer's kernels probed by the sensitivity analysis
RATIOS = tuple(np.round(np.arange(1, 11) / 10, 1))


def layer_sensitivity(model: SplittableModel, order: dict, x_norm: jax.Array, y: np.ndarray,
                      ratios: Sequence[float] = RATIOS) -> dict:
    """Composed accuracy when one mask point keeps only its top ``floor(r * C)`` kernels (by
    each class's importance) and all others are full: ``{point: [accuracy per ratio]}``.

    The N modules are composed by argmax over module c's class-c logit (spec 1a.4).
    """
    n = model.num_classes
    points = {p.name: p.size for p in mask_points(model)}
    out = {}
    for point, size in points.items():
        accs = []
        for r in ratios:
            k = int(np.floor(r * size))
            masks = {q: np.ones((n, s), np.float32) for q, s in points.items()}
            keep = np.zeros((n, size), np.float32)
            for c in range(n):
                keep[c, order[point][c][:k]] = 1.0
            masks[point] = keep
            eff = effective_masks(masks)
            logits = module_logits(model, {q: jnp.asarray(v) for q, v in eff.items()}, np.arange(n), x_norm)
            accs.append(float((logits.argmax(0) == y).mean()))
        out[point] = accs
    return out


def sensitive_layers(sensitivity: dict, ratios: Sequence[float], drop: float = 0.05) -> tuple[str, ...]:
    """The automatic rule: a mask point is *sensitive* when keeping only half of its kernels
    (the ratio closest to 0.5) loses more than ``drop`` accuracy against keeping all."""
    r = list(ratios)
    half = int(np.argmin(np.abs(np.asarray(r) - 0.5)))
    full = int(np.argmax(r))
    return tuple(p for p, accs in sensitivity.items() if accs[full] - accs[half] > drop)
