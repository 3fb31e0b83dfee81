"""GradSplitter's state and steps (optax style): ``init`` -> ``GradSplitterState``; one jitted
``modularity_step`` (masks and heads, all N modules in one step) and ``head_step`` (heads only,
on cached module features); the feature passes of head phases.

Head phases do less work than the reference: masks are frozen, so each image's module logits
are computed once per phase (``features_for_dataset``: forward only, modules with identical
masks computed once) and the head steps train on those cached features; ``head_step_plain``
is the plain formulation they are tested against.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ...data import map_batches, normalize
from ...models import MaskedCNN, mask_points
from ...modules.forward import default_chunk, masked_logits
from ...modules.heads import Heads, head_scores, init_heads
from .config import HEAD, GradSplitterConfig, phase_lr
from .loss import binarize, head_loss, loss_fn
from .memory import use_remat

__all__ = ["GradSplitterState", "init", "reset_optimizer", "modularity_step", "head_step",
           "head_step_plain", "module_features", "features_for_dataset", "composed_scores"]


class GradSplitterState(NamedTuple):
    """Everything that evolves during a search (one pytree: jit-, vmap- and checkpoint-safe).

    masks: real-valued ``{mask_point: [N, C]}``; heads: ``Heads``; opt_state: Adam state
    (``inject_hyperparams``: its learning rate lives in the state); key: PRNG key for the
    epoch shuffles; step: optimisation steps taken.
    """

    masks: dict
    heads: Heads
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array


def _tx():
    return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8)


def init(key: jax.Array, model: MaskedCNN, cfg: GradSplitterConfig = GradSplitterConfig()) -> GradSplitterState:
    """Fresh search state for ``model.num_classes`` modules."""
    n = model.num_classes
    k_mask, k_head, k_run = jax.random.split(key, 3)
    masks = {}
    for i, p in enumerate(mask_points(model)):
        if cfg.init == "ones":
            masks[p.name] = jnp.ones((n, p.size), jnp.float32)
        elif cfg.init == "zeros":
            masks[p.name] = jnp.zeros((n, p.size), jnp.float32)
        else:
            masks[p.name] = jax.random.normal(jax.random.fold_in(k_mask, i), (n, p.size))
    heads = init_heads(k_head, n, model.num_classes)
    state = GradSplitterState(masks, heads, None, k_run, jnp.zeros((), jnp.int32))
    return reset_optimizer(state, phase_lr(cfg, 0, HEAD))


def reset_optimizer(state: GradSplitterState, lr: float) -> GradSplitterState:
    """A fresh Adam state (new moments, step count 0) with learning rate ``lr``."""
    opt = _tx().init({"masks": state.masks, "heads": state.heads})
    opt.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return state._replace(opt_state=opt)


def _apply(state, grads):
    params = {"masks": state.masks, "heads": state.heads}
    upd, opt = _tx().update(grads, state.opt_state, params)
    params = optax.apply_updates(params, upd)
    return state._replace(masks=params["masks"], heads=params["heads"], opt_state=opt,
                          step=state.step + 1)


@functools.partial(jax.jit, static_argnames=("chunk", "remat"))
def _mod_step(model, alpha, state, x, y, chunk=None, remat=False):
    params = {"masks": state.masks, "heads": state.heads}
    (loss, (ce, kern, scores)), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model, x, y, alpha, chunk, remat)
    acc = (scores.argmax(-1) == y).mean()
    return _apply(state, g), {"loss": loss, "ce": ce, "kernels": kern, "acc": acc}


def modularity_step(model, cfg, state, x, y):
    """One masks+heads Adam step on normalised images x [B, H, W, C], labels y [B]."""
    n = state.heads.w1.shape[0]
    chunk = default_chunk(n, cfg.module_chunk)
    remat = use_remat(cfg.remat, model, n, x.shape[0])
    if remat and cfg.module_chunk is None:  # groups of at most 10 modules, so that one group is small
        chunk = min(chunk, 10, max(1, n // 4))
    return _mod_step(model, jnp.float32(cfg.alpha), state, x, y, chunk=chunk, remat=remat)


@jax.jit
def _head_step(state, feats, y):
    (loss, scores), gh = jax.value_and_grad(head_loss, has_aux=True)(state.heads, feats, y)
    g = {"masks": jax.tree.map(jnp.zeros_like, state.masks), "heads": gh}
    acc = (scores.argmax(-1) == y).mean()
    return _apply(state, g), {"loss": loss, "ce": loss, "kernels": jnp.float32(0), "acc": acc}


def head_step(cfg, state, feats, y):
    """One heads-only Adam step on cached module features ``feats`` [B, N, K].

    Masks get zero gradients, so with the fresh Adam of a head phase they do not move.
    """
    del cfg
    return _head_step(state, feats, y)


@jax.jit
def _head_step_plain(model, state, x, y):
    def f(heads):
        b = {k: binarize(v) for k, v in state.masks.items()}
        feats = jnp.swapaxes(masked_logits(model, b, x), 0, 1)
        return head_loss(heads, feats, y)

    (loss, scores), gh = jax.value_and_grad(f, has_aux=True)(state.heads)
    g = {"masks": jax.tree.map(jnp.zeros_like, state.masks), "heads": gh}
    return _apply(state, g), {"loss": loss, "acc": (scores.argmax(-1) == y).mean()}


def head_step_plain(model, cfg, state, x, y):
    """The plain head step (module forward inside the step, as the reference); for tests."""
    del cfg
    return _head_step_plain(model, state, x, y)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _features(model, masks_bin, x, chunk=None):
    return jnp.swapaxes(masked_logits(model, masks_bin, x, chunk), 0, 1)


def module_features(model: MaskedCNN, masks: Mapping[str, jax.Array], x: jax.Array,
                    chunk: int | None = None) -> jax.Array:
    """Per-module logits [B, N, K] under the binarised ``masks`` (forward only)."""
    n = next(iter(masks.values())).shape[0]
    return _features(model, {k: binarize(v) for k, v in masks.items()}, x,
                     chunk=default_chunk(n, chunk))


def features_for_dataset(model: MaskedCNN, masks: Mapping[str, jax.Array], x_u8: np.ndarray, mean, std,
                         batch_size: int = 256, dedupe: bool = True, chunk: int | None = None) -> np.ndarray:
    """Module features [n, N, K] for uint8 images, computing modules with equal masks once.

    Unique binary mask sets are padded to a power of two (bounded recompiles). ``chunk``:
    modules per vmapped group (default: ``default_chunk``).
    """
    bin_np = {k: np.asarray(v > 0) for k, v in masks.items()}
    n_mod = next(iter(bin_np.values())).shape[0]
    flat = np.concatenate([bin_np[k] for k in bin_np], axis=1)
    if dedupe:
        _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    else:
        first, inverse = np.arange(n_mod), np.arange(n_mod)
    u = len(first)
    padded = 1 << (u - 1).bit_length() if u > 1 else 1
    padded = min(padded, n_mod) if dedupe else n_mod
    sel = np.concatenate([first, np.repeat(first[:1], padded - u)])
    uniq = {k: jnp.asarray(v[sel], jnp.float32) for k, v in bin_np.items()}
    mean, std = jnp.asarray(mean), jnp.asarray(std)
    chunk = default_chunk(padded, chunk)
    feats = map_batches(lambda xb: _features(model, uniq, normalize(jnp.asarray(xb), mean, std), chunk=chunk),
                        [x_u8], batch_size, pad=False)
    return feats[:, inverse]


_scores_jit = jax.jit(head_scores)


def composed_scores(heads: Heads, feats: np.ndarray) -> np.ndarray:
    """Scores [n, N] of the composed modules from features [n, N, K]."""
    return np.asarray(_scores_jit(heads, jnp.asarray(feats)))
