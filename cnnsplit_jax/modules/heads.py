"""How a module turns its logits into one score.

A module is the base model under the module's masks. Its score for images ``x`` is

* GradSplitter: ``sigmoid(head(relu(logits)))``, where ``head`` is that module's own
  ``Linear(K, 10) -> ReLU -> Linear(10, 1)`` (``Heads``, stacked over modules);
* CNNSplitter (no heads): the raw logit of the module's class, ``logits[:, class]``;
* concern modules (Pan & Rajan): the lab's channeled K-column output ``[l_c, l_uc, 0, ...]``:
  score ``softmax(...)[0]`` (``positive_probability``), "positive" when its argmax is l_c
  (``concern_positive``), composed by the lab's vote (``vote_scores``).

``scores_from_logits`` applies either rule to stacked per-module logits, so composition and
evaluation treat both kinds of module sets alike.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Heads", "init_heads", "head_scores", "scores_from_logits", "positive_probability",
           "concern_positive", "vote_scores"]


class Heads(NamedTuple):
    """Per-module heads, stacked over N modules: K -> 10 -> 1."""

    w1: jax.Array  # [N, K, 10]
    b1: jax.Array  # [N, 10]
    w2: jax.Array  # [N, 10]
    b2: jax.Array  # [N]


def init_heads(key: jax.Array, num_modules: int, num_classes: int, hidden: int = 10) -> Heads:
    """PyTorch-default init (U(+-1/sqrt(fan_in))) for every module's head."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    u = lambda k, shape, fan: jax.random.uniform(k, shape, jnp.float32, -1, 1) / np.sqrt(fan)  # noqa: E731
    return Heads(
        u(k1, (num_modules, num_classes, hidden), num_classes),
        u(k2, (num_modules, hidden), num_classes),
        u(k3, (num_modules, hidden), hidden),
        u(k4, (num_modules,), hidden),
    )


def head_scores(heads: Heads, feats: jax.Array) -> jax.Array:
    """Module scores [B, N] from per-module logits ``feats`` [B, N, K] (ReLU applied here)."""
    h = jax.nn.relu(jnp.einsum("bnk,nkh->bnh", jax.nn.relu(feats), heads.w1) + heads.b1)
    return jax.nn.sigmoid(jnp.einsum("bnh,nh->bn", h, heads.w2) + heads.b2)


def scores_from_logits(heads: Heads | None, classes: jax.Array, feats: jax.Array) -> jax.Array:
    """Scores [B, N] from per-module logits ``feats`` [B, N, K].

    heads: stacked ``Heads`` (sigmoid head scores) or ``None`` (the logit of ``classes`` [N],
    each module's class in its base model).
    """
    if heads is not None:
        return head_scores(heads, feats)
    return jnp.take_along_axis(feats, jnp.asarray(classes)[None, :, None], axis=-1)[..., 0]


def positive_probability(logits2: jax.Array, num_classes: int) -> jax.Array:
    """Probability of the concerned class from binary logits [..., 2] of a channeled K-column
    output whose other K - 2 columns are zero (the lab's evaluation): softmax over
    ``[l_c, l_uc, 0 x (K - 2)]``, first entry."""
    lc, luc = logits2[..., 0], logits2[..., 1]
    m = jnp.maximum(jnp.maximum(lc, luc), 0.0)
    num = jnp.exp(lc - m)
    return num / (num + jnp.exp(luc - m) + (num_classes - 2) * jnp.exp(-m))


def concern_positive(logits2: jax.Array, num_classes: int) -> jax.Array:
    """bool [...]: a concern module says "my class" when the argmax of its channeled K-column
    output ``[l_c, l_uc, 0 x (K - 2)]`` is the concerned column (the lab's decision):
    ``l_c > l_uc`` and, when K > 2, ``l_c > 0`` (exact ties count as negative)."""
    lc, luc = logits2[..., 0], logits2[..., 1]
    pos = lc > luc
    return pos & (lc > 0) if num_classes > 2 else pos


def vote_scores(prob: jax.Array, positive: jax.Array) -> jax.Array:
    """Pan & Rajan's vote (the lab's composition) as scores [B, K]: positive modules get
    ``prob + 1``, the others ``prob``. Argmax: the only positive module; with several, the most
    confident *among the positive ones*; with none, the most confident of all. The order ranks
    top-k (positive modules first)."""
    return prob + positive.astype(prob.dtype)
