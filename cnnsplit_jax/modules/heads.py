"""How a module turns its logits into one score.

A module is the base model under the module's masks. Its score for images ``x`` is

* GradSplitter: ``sigmoid(head(relu(logits)))``, where ``head`` is that module's own
  ``Linear(K, 10) -> ReLU -> Linear(10, 1)`` (``Heads``, stacked over modules);
* CNNSplitter (no heads): the raw logit of the module's class, ``logits[:, class]``.

``scores_from_logits`` applies either rule to stacked per-module logits, so composition and
evaluation treat both kinds of module sets alike.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Heads", "init_heads", "head_scores", "scores_from_logits"]


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
