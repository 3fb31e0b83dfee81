"""CNNSplitter's grouped binary genome (spec cnnsplitter.md 1b.2-1b.3).

One genome per class. Each *genome layer* is a mask point (ResCNN's tied pairs are one genome
layer). Its kernels, sorted by descending class importance, are cut into contiguous groups
(``np.array_split``: the first ``C % g`` groups are one larger); gene i = 1 keeps every kernel
of the i-th most important group. Genome layers follow the order of the *last* conv each mask
point gates, which is the reference's order (ResCNN: conv_0, conv_2, conv_1=3, conv_4, conv_6,
conv_5=7, conv_8, conv_10, conv_9=11).

``decode`` and ``heuristic_population`` are pure JAX functions (jit- and vmap-safe).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ...models import mask_points
from ...models.protocol import SplittableModel

__all__ = ["GenomeLayer", "GenomeLayout", "genome_layout", "decode", "heuristic_population"]


class GenomeLayer(NamedTuple):
    """point: mask-point name; size: kernels C; sizes: group sizes (sum C); start: first gene."""

    point: str
    size: int
    sizes: tuple[int, ...]
    start: int

    @property
    def num_groups(self) -> int:
        return len(self.sizes)


class GenomeLayout(NamedTuple):
    """Static description of a model's genome: ``layers`` in gene order, ``num_genes``."""

    layers: tuple[GenomeLayer, ...]
    num_genes: int

    def layer(self, point: str) -> GenomeLayer:
        for lay in self.layers:
            if lay.point == point:
                return lay
        raise KeyError(point)


def _default_groups(size: int) -> int:
    return 10 if size < 256 else 100


def genome_layout(model: SplittableModel, groups: int | Mapping[str, int] | None = None) -> GenomeLayout:
    """The genome of ``model``: reference group counts (10 below 256 kernels, else 100),
    or ``groups`` (one count for every layer, or per mask point), capped at the kernel count."""
    last = {}
    for i, s in enumerate(model.topology):
        last[s.mask] = i
    points = sorted(mask_points(model), key=lambda p: last[p.name])
    layers, start = [], 0
    for p in points:
        if groups is None:
            g = _default_groups(p.size)
        elif isinstance(groups, Mapping):
            g = int(groups.get(p.name, _default_groups(p.size)))
        else:
            g = int(groups)
        if g < 1:
            raise ValueError(f"group count must be >= 1, got {g} for {p.name}")
        g = min(g, p.size)
        sizes = tuple(int(len(a)) for a in np.array_split(np.arange(p.size), g))
        layers.append(GenomeLayer(p.name, p.size, sizes, start))
        start += g
    return GenomeLayout(tuple(layers), start)


def decode(layout: GenomeLayout, genome: jax.Array, order: Mapping[str, jax.Array]) -> dict:
    """Masks ``{point: float 0/1 [C]}`` of a genome [G].

    order: ``{point: int [C]}`` kernel indices sorted by descending importance for the
    genome's class (``order[p][0]`` is the most important kernel).
    """
    genome = jnp.asarray(genome)
    if genome.shape[-1] != layout.num_genes:
        raise ValueError(f"genome has {genome.shape[-1]} genes, the layout {layout.num_genes}")
    out = {}
    for lay in layout.layers:
        genes = genome[lay.start : lay.start + lay.num_groups]
        per_rank = jnp.repeat(genes, np.asarray(lay.sizes), total_repeat_length=lay.size)
        out[lay.point] = jnp.zeros(lay.size, jnp.float32).at[jnp.asarray(order[lay.point])].set(
            per_rank.astype(jnp.float32))
    return out


def heuristic_population(
    key: jax.Array,
    layout: GenomeLayout,
    population_size: int,
    sensitive: Sequence[str],
    sensitive_ratios: Sequence[float],
    other_ratios: Sequence[float],
) -> jax.Array:
    """The reference's importance-weighted initial population, float 0/1 [P, G].

    Per individual and genome layer with ``ng`` groups: a ratio r drawn uniformly from the
    layer's list (``sensitive_ratios`` for mask points in ``sensitive``, else
    ``other_ratios``), then ``floor(ng * r)`` distinct groups drawn without replacement with
    probabilities ``exp((ng - 1 - j) / 10)`` (j = 0: the most important group). Sampling
    without replacement = the top-n of Gumbel-perturbed log-probabilities.
    """
    unknown = set(sensitive) - {lay.point for lay in layout.layers}
    if unknown:
        raise ValueError(f"unknown sensitive layer(s) {sorted(unknown)}")
    parts = []
    keys = jax.random.split(key, len(layout.layers))
    for k, lay in zip(keys, layout.layers):
        ng = lay.num_groups
        ratios = jnp.asarray(sensitive_ratios if lay.point in sensitive else other_ratios, jnp.float32)
        kr, kg = jax.random.split(k)
        r = jax.random.choice(kr, ratios, (population_size,))
        n_active = jnp.floor(ng * r + 1e-6).astype(jnp.int32)
        logits = (ng - 1 - jnp.arange(ng)) / 10.0
        scores = logits + jax.random.gumbel(kg, (population_size, ng))
        rank = jnp.argsort(jnp.argsort(-scores, axis=1), axis=1)
        parts.append((rank < n_active[:, None]).astype(jnp.float32))
    return jnp.concatenate(parts, axis=1)
