"""GradSplitter's loss: binary masks through a straight-through step, per-module heads, and

    CE(softmax over the N module scores, label) + ratio * mean(binary masks of all modules)

with ``ratio = alpha`` in modularization phases and 0 in head phases. The module scores are
``sigmoid(head_i(relu(logits_i)))`` where ``logits_i`` are the frozen base model's logits under
module i's binary masks (``modules.forward.masked_logits``: all modules in one vmapped call).
The kernel term averages every conv layer's binary masks (ResCNN's tied layers counted once
per gated conv).

As the reference, the step is applied at every *use* of a mask (each conv it gates, and each
layer's entry in the kernel term), so each use's gradient is clipped to [-1, 1] on its own and
a mask receives the sum of its clipped gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ...modules.forward import masked_logits
from ...modules.heads import head_scores

__all__ = ["binarize", "loss_fn", "head_loss"]


@jax.custom_vjp
def binarize(m: jax.Array) -> jax.Array:
    """Strict step ``(m > 0)`` as float; gradient: the incoming gradient clipped to [-1, 1]."""
    return (m > 0).astype(m.dtype)


def _binarize_fwd(m):
    return binarize(m), None


def _binarize_bwd(_, g):
    return (jnp.clip(g, -1.0, 1.0),)


binarize.defvjp(_binarize_fwd, _binarize_bwd)


def loss_fn(params, model, x, y, ratio, chunk=None, remat=False, n_real=None, shards=1):
    """(loss, (ce, kernel_term, scores [B, N])) for ``params = {"masks", "heads"}`` on
    normalised images x [B, H, W, C] and labels y [B].

    n_real: the first ``n_real`` modules are real, the rest padding (a module axis padded to
    split over ``shards`` devices): padding enters neither the softmax nor the kernel term,
    so it gets zero gradients and the result equals the unpadded loss.
    """
    masks = params["masks"]
    logits = masked_logits(model, masks, x, chunk, mask_fn=binarize, remat=remat,
                           shards=shards)  # [N, B, K], the step at every use
    scores = head_scores(params["heads"], jnp.swapaxes(logits, 0, 1))[:, :n_real]
    ce = optax.softmax_cross_entropy_with_integer_labels(scores, y).mean()
    # every conv layer's binary mask (a tied point once per gated conv), each its own step
    kern = jnp.concatenate([binarize(masks[s.mask][:n_real]) for s in model.topology], axis=-1).mean()
    return ce + ratio * kern, (ce, kern, scores)


def head_loss(heads, feats, y, n_real=None):
    """(cross-entropy, scores [B, n_real]) of the heads on cached module logits ``feats``
    [B, N, K] (modules past ``n_real``: padding, left out)."""
    scores = head_scores(heads, feats)[:, :n_real]
    return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean(), scores
