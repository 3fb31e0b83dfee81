"""CNNSplitter's joint fitness (spec cnnsplitter.md 1b.4), vectorised in JAX.

All N classes' populations are scored together: compositions are built level by level
(pairs of groups of classes, in a shuffled class order), each level keeps the most accurate
candidate compositions (between ``min_keep`` and ``max_keep``: the number reaching the
level's accuracy threshold), scores them ``acc_ratio * acc + (1 - alpha) * diff`` (diff =
mean pairwise Jaccard distance of the members' kernel sets), re-adds the composition of
every class's individual 0 (the previous best: elitism) when pruning dropped it, and passes
the survivors on. An individual's fitness is the best fitness of a final composition
containing it (0 if none does).

Shapes are static: a group is ``slots`` compositions with a validity flag; candidates of a
pair are the ``a x b`` products of the two groups' slots. Predictions are carried as a
running (max logit, its class) per image, so combining two groups is an elementwise
comparison (``>=`` keeps the left group on ties, numpy's first-occurrence argmax).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FitnessConfig", "FitnessResult", "jaccard_distance_table", "joint_core", "joint_fitness",
           "reference_thresholds", "thresholds_for"]


def reference_thresholds(num_classes: int) -> dict[int, float]:
    """Accuracy thresholds per composition size of the SimCNN/ResCNN-CIFAR configs (10
    classes) and the svhn_5 configs (5 classes); other class counts use 0.95 / 0.85 / 0.80
    for 2 / <= half / larger compositions."""
    if num_classes == 10:
        return {2: 0.95, 4: 0.95, 8: 0.85, 10: 0.80}
    if num_classes == 5:
        return {2: 0.95, 4: 0.90, 5: 0.85}
    return {t: (0.95 if t == 2 else 0.85 if t <= num_classes // 2 else 0.80)
            for t in range(2, num_classes + 1)}


class FitnessConfig(NamedTuple):
    """alpha: 0.9 (diff weight 1 - alpha); thresholds: {composition size: min accuracy};
    min_keep / max_keep: survivors per level (50 / 500)."""

    alpha: float = 0.9
    thresholds: Mapping[int, float] | None = None
    min_keep: int = 50
    max_keep: int = 500


class FitnessResult(NamedTuple):
    """fitness [N, P]; best: member index per class of the fittest final composition [N];
    best_accuracy / best_diff / best_fitness of it."""

    fitness: jax.Array
    best: jax.Array
    best_accuracy: jax.Array
    best_diff: jax.Array
    best_fitness: jax.Array


def jaccard_distance_table(kernels: jax.Array) -> jax.Array:
    """D [N, N, P, P] = 1 - |S_cp & S_dq| / |S_cp | S_dq| from kernel sets [N, P, K] (0/1)."""
    k = kernels.astype(jnp.float32)
    inter = jnp.einsum("cpk,dqk->cdpq", k, k)
    size = k.sum(-1)
    union = size[:, None, :, None] + size[None, :, None, :] - inter
    return 1.0 - inter / jnp.maximum(union, 1.0)


class _Group(NamedTuple):
    members: jax.Array  # [S, N] int, -1 for classes outside the group
    maxv: jax.Array  # [S, n] running max logit
    arg: jax.Array  # [S, n] its class
    dsum: jax.Array  # [S] sum of pairwise distances
    acc: jax.Array  # [S]
    fit: jax.Array  # [S]
    valid: jax.Array  # [S] bool
    zero: jax.Array  # [S] bool: every member is index 0


def _leaf(c: int, logits_c, n_classes: int) -> _Group:
    p, n = logits_c.shape
    members = jnp.full((p, n_classes), -1, jnp.int32).at[:, c].set(jnp.arange(p))
    return _Group(members, logits_c, jnp.full((p, n), c, jnp.int32), jnp.zeros(p),
                  jnp.zeros(p), jnp.zeros(p), jnp.ones(p, bool), jnp.arange(p) == 0)


def _combine(A: _Group, B: _Group, cls_a, cls_b, y, D, thr, acc_ratio, cfg: FitnessConfig, guard):
    a, b = A.valid.shape[0], B.valid.shape[0]
    classes = jnp.asarray(list(cls_a) + list(cls_b))
    sel = jnp.isin(y, classes).astype(jnp.float32)  # images of the composition's classes
    n_sel = jnp.maximum(sel.sum(), 1.0)
    ca = (A.arg == y[None, :]).astype(jnp.float32) * sel
    cb = (B.arg == y[None, :]).astype(jnp.float32) * sel

    def rows(args):
        maxv_i, ca_i = args  # [n], [n]
        geq = (maxv_i[None, :] >= B.maxv).astype(jnp.float32)  # [b, n]
        return (geq * ca_i[None, :] + (1.0 - geq) * cb).sum(-1)  # [b]

    correct = jax.lax.map(rows, (A.maxv, ca))  # [a, b]
    acc = correct / n_sel
    cross = jnp.zeros((a, b))
    for ci in cls_a:
        for cj in cls_b:
            cross = cross + D[ci, cj][A.members[:, ci]][:, B.members[:, cj]]
    m = len(cls_a) + len(cls_b)
    diff = (A.dsum[:, None] + B.dsum[None, :] + cross) / (m * (m - 1) / 2)
    valid = A.valid[:, None] & B.valid[None, :]
    zero = (A.zero[:, None] & B.zero[None, :]).reshape(-1)
    acc_f = jnp.where(valid, acc, -jnp.inf).reshape(-1)
    diff_f, valid_f = diff.reshape(-1), valid.reshape(-1)
    k = min(cfg.max_keep, a * b)
    top_acc, top_idx = jax.lax.top_k(acc_f, k)  # ties: lower index first
    count = jnp.sum(valid_f & (acc_f >= thr))
    n_keep = jnp.clip(count, min(cfg.min_keep, k), cfg.max_keep)
    n_keep = jnp.minimum(n_keep, valid_f.sum())
    keep = (jnp.arange(k) < n_keep) & jnp.isfinite(top_acc)
    # the all-zeros composition (previous best ensemble) re-enters when pruning dropped it
    z_idx = jnp.argmax(zero & valid_f)
    z_in = jnp.any(keep & (top_idx == z_idx))
    add_z = guard & jnp.any(zero & valid_f) & ~z_in
    fit = acc_ratio * acc_f[top_idx] + (1.0 - cfg.alpha) * diff_f[top_idx]
    # survivors sorted by fitness (descending, stable); the re-added one goes last, as in
    # the reference's recorder
    order = jnp.argsort(jnp.where(keep, -fit, jnp.inf), stable=True)
    idx = jnp.concatenate([top_idx[order], z_idx[None]])
    keep = jnp.concatenate([keep[order], add_z[None]])
    fit = jnp.concatenate([fit[order], (acc_ratio * acc_f[z_idx] + (1.0 - cfg.alpha) * diff_f[z_idx])[None]])
    i, j = idx // b, idx % b
    members = jnp.where(A.members[i] >= 0, A.members[i], B.members[j])
    geq = A.maxv[i] >= B.maxv[j]
    return _Group(
        members,
        jnp.where(geq, A.maxv[i], B.maxv[j]),
        jnp.where(geq, A.arg[i], B.arg[j]),
        A.dsum[i] + B.dsum[j] + cross[i, j],
        jnp.where(keep, acc_f[idx], 0.0),
        jnp.where(keep, fit, -jnp.inf),
        keep,
        zero[idx] & keep,
    )


def joint_core(logits, y, D, perm, acc_ratio, guard, thresholds, cfg: FitnessConfig) -> FitnessResult:
    """``joint_fitness`` without its host-side checks, traceable: ``perm`` an int array [N]
    (the class order; the composition tree's shape depends only on N), ``guard`` a bool
    array, ``thresholds`` ``{size: float32}`` (static keys). jit-, scan- and vmap-safe."""
    n_classes = logits.shape[0]
    perm = [perm[i] for i in range(n_classes)]
    groups = [(_leaf(c, logits[c], n_classes), (c,)) for c in perm]
    while len(groups) > 1:
        nxt = []
        for g in range(0, len(groups) - 1, 2):
            (A, ca), (B, cb) = groups[g], groups[g + 1]
            t = len(ca) + len(cb)
            nxt.append((_combine(A, B, ca, cb, y, D, thresholds[t], acc_ratio, cfg, guard), ca + cb))
        if len(groups) % 2:
            nxt.append(groups[-1])
        groups = nxt
    final = groups[0][0]
    p = logits.shape[1]
    fit = jnp.zeros((n_classes, p))
    f = jnp.where(final.valid, final.fit, -jnp.inf)
    for c in range(n_classes):
        fit = fit.at[c, final.members[:, c]].max(jnp.where(final.valid, f, 0.0))
    best = 0  # the fittest sorted survivor (a re-added elite is never in slot 0)
    m = n_classes
    return FitnessResult(fit, final.members[best], final.acc[best],
                         final.dsum[best] / (m * (m - 1) / 2), final.fit[best])


_joint = jax.jit(joint_core, static_argnames=("cfg",))


def thresholds_for(n: int, cfg: FitnessConfig) -> dict[int, float]:
    """The accuracy threshold of every composition size the joint fitness of ``n`` classes
    builds (``cfg.thresholds``, else the reference's); ValueError naming the sizes without one."""
    thr = dict(cfg.thresholds or reference_thresholds(n))
    sizes = set()
    groups = [1] * n
    while len(groups) > 1:
        groups = [groups[i] + groups[i + 1] for i in range(0, len(groups) - 1, 2)] + (
            [groups[-1]] if len(groups) % 2 else [])
        sizes.update(groups)
    missing = sorted(s for s in sizes if s > 1 and s not in thr)
    if missing:
        raise ValueError(f"no accuracy threshold for composition sizes {missing}")
    return thr


def joint_fitness(logits: jax.Array, labels: jax.Array, D: jax.Array, perm, *,
                  acc_ratio: float, generation: int, cfg: FitnessConfig = FitnessConfig()) -> FitnessResult:
    """Fitness [N, P] of every individual of every class.

    Args:
      logits: [N, P, n] class-c logit of module (c, p) on each evaluation image.
      labels: [n] int labels; D: [N, N, P, P] Jaccard distances (``jaccard_distance_table``).
      perm: the class order of this generation (a permutation of range(N); traced, so a new
        order per generation does not recompile).
      acc_ratio: accuracy weight (alpha at first, ``alpha + max(0, gamma - acc_top)`` later).
      generation: the elitism guard applies from generation 1 on.
    """
    n = logits.shape[0]
    if sorted(int(c) for c in perm) != list(range(n)):
        raise ValueError(f"perm must be a permutation of range({n}), got {list(perm)}")
    if not np.all(np.isfinite(np.asarray(logits))):
        raise FloatingPointError("module logits contain NaN/inf")
    thr = thresholds_for(n, cfg)
    cfg = cfg._replace(thresholds=None)
    return _joint(jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32), jnp.asarray(D),
                  jnp.asarray([int(c) for c in perm], jnp.int32), jnp.float32(acc_ratio), jnp.bool_(generation > 0),
                  {k: jnp.float32(v) for k, v in thr.items()}, cfg)
