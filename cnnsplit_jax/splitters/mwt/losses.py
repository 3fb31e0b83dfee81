"""MwT's modular losses over per-sample masks (spec mwt.md, "Loss").

For each masked layer l with masks M_l [B, C_l] (non-negative): every sample's mask is scaled
to unit L2 norm (PyTorch's ``F.normalize``: divided by max(norm, 1e-12), so an all-zero mask
stays zero), S = M̂ M̂ᵀ holds the cosine similarities (in [0, 1]), and over the pairs i < j
(the upper triangle, no diagonal):

* cohesion_l = 1 - mean of S over pairs with the same label;
* coupling_l = mean of S over pairs with different labels.

Each is averaged over the layers; the loss is ``CE + alpha * cohesion + beta * coupling``
(the reference's alpha 0.5, beta 1.5). The kernel rate, logged only, is the mean over layers
of the fraction of mask entries > 0.

A batch without a same-label pair (or without a different-label pair) has nothing to pull
together (apart): that term is 0 for the layer. The reference takes the mean of an empty set
there, which is NaN and poisons the step; with batch 128 over 10 classes it does not occur.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

__all__ = ["mask_losses", "mwt_loss", "modular_loss"]


def _pair_means(m: jax.Array, same: jax.Array, diff: jax.Array):
    norm = jnp.maximum(jnp.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    u = m / norm
    s = u @ u.T
    n_same, n_diff = same.sum(), diff.sum()
    mean_same = jnp.where(n_same > 0, (s * same).sum() / jnp.maximum(n_same, 1), 1.0)
    mean_diff = jnp.where(n_diff > 0, (s * diff).sum() / jnp.maximum(n_diff, 1), 0.0)
    return 1.0 - mean_same, mean_diff


def mask_losses(masks: Sequence[jax.Array], labels: jax.Array) -> dict:
    """``{"cohesion", "coupling", "kernel_rate"}`` (scalars) of per-layer masks
    ``[B, C_l]`` (one per masked layer, in any order) and integer labels [B]; jittable."""
    if not masks:
        raise ValueError("mask_losses needs the masks of at least one layer")
    labels = jnp.asarray(labels)
    b = labels.shape[0]
    for m in masks:
        if m.ndim != 2 or m.shape[0] != b:
            raise ValueError(f"every layer's masks must be [B={b}, C], got {tuple(m.shape)}")
    upper = jnp.triu(jnp.ones((b, b), bool), k=1)
    eq = labels[:, None] == labels[None, :]
    same, diff = (upper & eq).astype(jnp.float32), (upper & ~eq).astype(jnp.float32)
    coh, cou = zip(*(_pair_means(m.astype(jnp.float32), same, diff) for m in masks))
    rate = [jnp.mean((m > 0).astype(jnp.float32)) for m in masks]
    n = len(masks)
    return {"cohesion": sum(coh) / n, "coupling": sum(cou) / n, "kernel_rate": sum(rate) / n}


def mwt_loss(logits: jax.Array, labels: jax.Array, masks: Sequence[jax.Array], alpha: float = 0.5,
             beta: float = 1.5) -> tuple[jax.Array, dict]:
    """MwT's training loss: mean cross-entropy of ``logits`` [B, K] + alpha * cohesion +
    beta * coupling; returns ``(loss, {"ce", "cohesion", "coupling", "kernel_rate"})``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.asarray(labels)).mean()
    parts = mask_losses(masks, labels)
    return ce + alpha * parts["cohesion"] + beta * parts["coupling"], {"ce": ce, **parts}


def modular_loss(model, gen_params: dict, x: jax.Array, labels: jax.Array, *, alpha: float = 0.5,
                 beta: float = 1.5, train: bool = False, dropout_key: jax.Array | None = None,
                 dropout: bool = True):
    """MwT's loss of a zoo model run with the generators ``gen_params`` ({layer: params},
    ``generators.init_generators``) on normalised images x [B, H, W, C]: ``mwt_loss`` over the
    masks of every generated layer. Returns ``(loss, parts)``; jit- and grad-safe (BatchNorm in
    ``train`` mode updates the model's running statistics, as any training forward)."""
    from .generators import sample_gates

    gates = sample_gates(gen_params)
    logits = model(x, gates, train=train, dropout_key=dropout_key, dropout=dropout)
    loss, parts = mwt_loss(logits, labels, [gates.masks[p] for p in gen_params], alpha, beta)
    return loss, {**parts, "accuracy": jnp.mean(logits.argmax(-1) == labels)}
