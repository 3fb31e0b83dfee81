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

from ... import distributed as dist
from ... import mesh as meshlib
from ...data import map_batches, normalize
from ...models import mask_points
from ...models.protocol import SplittableModel
from ...modules.forward import default_chunk, masked_logits
from ...modules.heads import Heads, head_scores, init_heads
from .config import HEAD, GradSplitterConfig, phase_lr
from .loss import binarize, head_loss, loss_fn
from .memory import use_remat

__all__ = ["GradSplitterState", "init", "reset_optimizer", "modularity_step", "head_step",
           "head_step_plain", "module_features", "features_for_dataset", "feature_head_scores", "place",
           "unplace"]


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


def init(key: jax.Array, model: SplittableModel, cfg: GradSplitterConfig = GradSplitterConfig()) -> GradSplitterState:
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


def place(state: GradSplitterState, mesh, n_to: int | None = None) -> GradSplitterState:
    """``state`` on ``mesh``: every per-module leaf (masks, heads, their Adam moments; leading
    axis N) padded to ``n_to`` (default: ``mesh.padded(N, mesh)``) with copies of module 0 and
    split along the ``modules`` axis; scalars (step, key, Adam's count and learning rate)
    replicated. Unchanged without a mesh."""
    if mesh is None:
        return state
    n = state.heads.w1.shape[0]
    n_to = meshlib.padded(n, mesh) if n_to is None else n_to
    per = lambda t: meshlib.shard_rows(meshlib.pad_rows(t, n_to), mesh)  # noqa: E731
    opt = state.opt_state
    per_module = lambda v: getattr(v, "ndim", 0) > 0 and v.shape[0] == n  # noqa: E731
    opt = jax.tree.map(lambda v: per(v) if per_module(v) else meshlib.replicate(v, mesh), opt)
    return state._replace(masks=per(state.masks), heads=per(state.heads), opt_state=opt,
                          key=meshlib.replicate(state.key, mesh), step=meshlib.replicate(state.step, mesh))


def unplace(state: GradSplitterState, n: int) -> GradSplitterState:
    """The first ``n`` modules of a padded state, gathered to the host (from every process in
    a multi-process run): what checkpoints hold, so a search saved on one mesh resumes on any
    other."""
    n_pad = state.heads.w1.shape[0]
    cut = lambda v: dist.host(v)[:n] if getattr(v, "ndim", 0) > 0 and v.shape[0] == n_pad else v  # noqa: E731
    return GradSplitterState(jax.tree.map(cut, state.masks), jax.tree.map(cut, state.heads),
                             jax.tree.map(cut, state.opt_state), state.key, state.step)


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


@functools.partial(jax.jit, static_argnames=("chunk", "remat", "n_real", "shards"))
def _mod_step(model, alpha, state, x, y, chunk=None, remat=False, n_real=None, shards=1):
    params = {"masks": state.masks, "heads": state.heads}
    (loss, (ce, kern, scores)), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model, x, y, alpha, chunk, remat, n_real, shards)
    acc = (scores.argmax(-1) == y).mean()
    return _apply(state, g), {"loss": loss, "ce": ce, "kernels": kern, "acc": acc}


def modularity_step(model, cfg, state, x, y, *, mesh=None, n_real: int | None = None):
    """One masks+heads Adam step on normalised images x [B, H, W, C], labels y [B].

    mesh: the ``place``-d state's mesh (its ``modules`` axis splits the modules; a ``data``
    axis splits x and y when B divides it); n_real: real modules when the state is padded.
    """
    n = state.heads.w1.shape[0]
    shards = meshlib.axis_size(mesh, "modules")
    local, b_local = n // shards, _batch_split(x.shape[0], mesh)
    remat = use_remat(cfg.remat, model, local, b_local)
    chunk = default_chunk(local, cfg.module_chunk) if shards == 1 or cfg.module_chunk else None
    if remat and cfg.module_chunk is None:  # groups of at most 10 modules, so that one group is small
        chunk = min(chunk or local, 10, max(1, local // 4))
    if mesh is not None:
        x, y = meshlib.shard_batch((x, y), mesh)
    return _mod_step(model, jnp.float32(cfg.alpha), state, x, y, chunk=chunk, remat=remat,
                     n_real=None if n_real == n else n_real, shards=shards)


def _batch_split(b: int, mesh) -> int:
    d = meshlib.axis_size(mesh, "data")
    return b // d if b % d == 0 else b


@functools.partial(jax.jit, static_argnames=("n_real",))
def _head_step(state, feats, y, n_real=None):
    (loss, scores), gh = jax.value_and_grad(head_loss, has_aux=True)(state.heads, feats, y, n_real)
    g = {"masks": jax.tree.map(jnp.zeros_like, state.masks), "heads": gh}
    acc = (scores.argmax(-1) == y).mean()
    return _apply(state, g), {"loss": loss, "ce": loss, "kernels": jnp.float32(0), "acc": acc}


def head_step(cfg, state, feats, y, *, n_real: int | None = None):
    """One heads-only Adam step on cached module features ``feats`` [B, N, K] (N: the state's
    module count, padding included; ``n_real`` real ones).

    Masks get zero gradients, so with the fresh Adam of a head phase they do not move.
    """
    del cfg
    n = state.heads.w1.shape[0]
    return _head_step(state, feats, y, n_real=None if n_real == n else n_real)


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


def module_features(model: SplittableModel, masks: Mapping[str, jax.Array], x: jax.Array,
                    chunk: int | None = None) -> jax.Array:
    """Per-module logits [B, N, K] under the binarised ``masks`` (forward only)."""
    n = next(iter(masks.values())).shape[0]
    return _features(model, {k: binarize(v) for k, v in masks.items()}, x,
                     chunk=default_chunk(n, chunk))


def features_for_dataset(model: SplittableModel, masks: Mapping[str, jax.Array], x_u8: np.ndarray, mean, std,
                         batch_size: int = 256, dedupe: bool = True, chunk: int | None = None,
                         mesh=None) -> np.ndarray:
    """Module features [n, N, K] for uint8 images, computing modules with equal masks once.

    Unique binary mask sets are padded to a power of two (bounded recompiles). ``chunk``:
    modules per vmapped group (default: ``default_chunk``). mesh: the unique mask sets are
    padded to its ``modules`` axis and split over it (one vmap, partitioned by device).
    """
    bin_np = {k: dist.host(v > 0) for k, v in masks.items()}
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
    padded = meshlib.padded(padded, mesh)
    sel = np.concatenate([first, np.repeat(first[:1], padded - u)])
    uniq = meshlib.shard_rows({k: jnp.asarray(v[sel], jnp.float32) for k, v in bin_np.items()}, mesh)
    mean, std = jnp.asarray(mean), jnp.asarray(std)
    chunk = default_chunk(padded, chunk) if meshlib.axis_size(mesh, "modules") == 1 else None
    feats = map_batches(lambda xb: _features(model, uniq, normalize(jnp.asarray(xb), mean, std), chunk=chunk),
                        [x_u8], batch_size, pad=False)
    return feats[:, inverse]


_scores_jit = jax.jit(head_scores)


def feature_head_scores(heads: Heads, feats: np.ndarray) -> np.ndarray:
    """Scores [n, N] of the composed modules from features [n, N, K]."""
    return dist.host(_scores_jit(heads, jnp.asarray(feats)))
