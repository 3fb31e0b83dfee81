"""Concern identification's inputs: per class the concerned inputs (the lab's: up to 1000
training inputs the model predicts at > 0.9, in a seeded random order) and the negative
inputs of tangling identification (1:1, spread evenly over the other classes); the
membership matrix that lets one forward serve every module."""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...data import map_batches, normalize
from ...models import SplittableModel
from ...progress import RunWarning
from .config import ConcernConfig

__all__ = ["sample_sets", "confidence_filter", "membership", "unconfident_classes"]


def sample_sets(y: np.ndarray, num_classes: int, cfg: ConcernConfig, key: jax.Array,
                confident: Callable[[np.ndarray], np.ndarray] | None = None):
    """Per class: (concerned indices, negative indices) into ``y``.

    Concerned inputs of class c: its inputs in a seeded random order, those for which
    ``confident(indices) -> bool`` holds (all when ``confident`` is None or
    ``cfg.min_confidence`` is None), the first ``cfg.concerned_per_class`` of them;
    ``confident`` is asked in rounds, only for as many candidates as still needed. Negatives
    for class c: ``round(negative_ratio * n_c)`` inputs spread evenly over the other classes
    (the remainder to randomly chosen classes), sampled without replacement.
    """
    y = np.asarray(y)
    by_class = [np.flatnonzero(y == c) for c in range(num_classes)]
    missing = [c for c in range(num_classes) if by_class[c].size == 0]
    if missing:
        raise ValueError(f"no training inputs for class(es) {missing}")
    keys = jax.random.split(key, 2 * num_classes)
    perm = [np.asarray(jax.random.permutation(keys[c], idx)) for c, idx in enumerate(by_class)]
    budget = cfg.concerned_per_class
    if confident is None or cfg.min_confidence is None:
        concerned = [p if budget is None else p[:budget] for p in perm]
    else:
        concerned = _confident_first(perm, budget, confident, refuse=cfg.unconfident == "refuse")
    negatives = []
    for c in range(num_classes):
        others = [q for q in range(num_classes) if q != c]
        want = int(round(cfg.negative_ratio * concerned[c].size))
        base, extra = divmod(want, len(others))
        lucky = set(np.asarray(jax.random.permutation(keys[num_classes + c], len(others)))[:extra].tolist())
        take = []
        for j, q in enumerate(others):
            n = base + (1 if j in lucky else 0)
            # a different slice of class q's permutation than its own concerned inputs use
            take.append(perm[q][::-1][:n])
        negatives.append(np.concatenate(take) if take else np.zeros(0, np.int64))
    return concerned, negatives


def _confident_first(perm: list, budget: int | None, confident: Callable, refuse: bool = False) -> list:
    """Per class, the first ``budget`` indices of ``perm[c]`` that ``confident`` accepts; a class
    with none falls back to its unfiltered inputs with a ``RunWarning`` (``refuse``: a
    ``ValueError`` naming every such class)."""
    chosen = [[] for _ in perm]
    seen = [0] * len(perm)
    while True:
        ask = {}
        for c, p in enumerate(perm):
            need = len(p) if budget is None else budget - len(chosen[c])
            if need > 0 and seen[c] < len(p):
                ask[c] = p[seen[c]: seen[c] + 2 * need]  # twice the need: few rounds at a high accept rate
                seen[c] += len(ask[c])
        if not ask:
            break
        ok = np.asarray(confident(np.concatenate(list(ask.values()))), bool)
        at = 0
        for c, idx in ask.items():
            keep = idx[ok[at: at + len(idx)]]
            at += len(idx)
            chosen[c].extend(keep[: None if budget is None else budget - len(chosen[c])].tolist())
    empty = [c for c in range(len(perm)) if not chosen[c]]
    if refuse and empty:
        raise ValueError(f"class(es) {empty}: the model predicts none of their training inputs with "
                         "min_confidence; lower min_confidence, or let them fall back (unconfident='fallback')")
    out = []
    for c, p in enumerate(perm):
        if not chosen[c]:
            warnings.warn(f"class {c}: the model predicts none of its {len(p)} training inputs confidently "
                          "(min_confidence); using them unfiltered", RunWarning, stacklevel=3)
            chosen[c] = p[:budget].tolist()
        out.append(np.asarray(chosen[c], np.int64))
    return out


def unconfident_classes(concerned: Sequence[np.ndarray], confident: Callable | None) -> list[int]:
    """The classes whose concerned inputs fell back to unfiltered ones: their first input is
    not confident (a fallback happens only when none of the class's inputs is)."""
    if confident is None:
        return []
    firsts = np.asarray([c[0] for c in concerned if len(c)], np.int64)
    ok = np.asarray(confident(firsts), bool)
    with_inputs = [c for c in range(len(concerned)) if len(concerned[c])]
    return [c for c, good in zip(with_inputs, ok) if not good]


def membership(sets: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
    """float32 [N, S]: 1 where ``index[s]`` belongs to ``sets[n]`` (``index`` sorted, unique,
    and holding every member of every set)."""
    index = np.asarray(index)
    m = np.zeros((len(sets), len(index)), np.float32)
    for n, st in enumerate(sets):
        cols = np.searchsorted(index, st)
        if len(st) and (cols.max() >= len(index) or not np.array_equal(index[cols], st)):
            raise ValueError(f"set {n} has members missing from the index")
        m[n, cols] = 1.0
    return m


@functools.partial(jax.jit, static_argnums=0)
def _confident(graphdef, state, x, y, threshold):
    """bool [B]: the model predicts label y with softmax probability > threshold."""
    model = nnx.merge(graphdef, state)
    logits = model.fc(model.node_forward(x))
    prob = jax.nn.softmax(logits, -1)
    return (logits.argmax(-1) == y) & (jnp.take_along_axis(prob, y[:, None], -1)[:, 0] > threshold)


def confidence_filter(model: SplittableModel, x_u8: np.ndarray, y: np.ndarray, mean, std, threshold: float,
                      batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
    """``indices -> bool``: whether the model predicts ``y[i]`` for image ``x_u8[i]`` with a
    softmax probability above ``threshold`` (the lab's choice of concerned inputs)."""
    graphdef, state = nnx.split(model)
    y = np.asarray(y, np.int32)

    def run(idx):
        return map_batches(lambda xb, yb: _confident(graphdef, state, jnp.asarray(normalize(xb, mean, std)),
                                                     jnp.asarray(yb), threshold),
                           [x_u8[idx], y[idx]], batch_size)
    return run
