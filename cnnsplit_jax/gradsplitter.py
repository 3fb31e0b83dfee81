"""GradSplitter (Qi et al., TOSEM 2023): per-module kernel masks learned by gradient descent.

For each class i a module keeps the kernels where its real-valued mask ``m_i > 0`` (strict
step; the backward pass is the incoming gradient clipped to [-1, 1]) and adds a head
``Linear(N, 10) -> ReLU -> Linear(10, 1) -> sigmoid`` on ``relu(logits_i)``, where
``logits_i`` are the frozen base model's logits with module i's masks applied (BN in
inference mode, no dropout). Loss::

    CE(softmax over the N sigmoid scores, label) + ratio * mean(binary masks of all modules)

with ``ratio = alpha`` in modularization phases and 0 in head phases (ResCNN's tied layers
counted once per gated conv). Schedule: ``head_epochs`` head-only epochs, then cycles of
5 modularization + 2 head epochs; a fresh Adam at every phase change (head phases: heads only,
``lr_head`` at first, ``lr_head * 0.1`` later; modularization: masks and heads,
``lr_modularity``). Defaults equal the reference's.

All N modules run inside one ``jax.jit`` step, vmapped (one vmap over all modules on GPU/TPU;
on the CPU vmapped groups of 2 in the same step, measured faster: ``module_chunk``). Head
phases do less work
than the reference: masks are frozen, so each image's module logits are computed once per
phase (forward only, modules with identical masks computed once) and the head steps train on
those cached features; ``head_step_plain`` is the plain formulation they are tested against.

API (optax/evosax style)::

    state = init(key, model, cfg)                       # GradSplitterState pytree
    state, m = modularity_step(model, cfg, state, x, y)  # masks + heads
    feats = module_features(model, state.masks, x)       # [B, N, K] frozen-mask features
    state, m = head_step(cfg, state, feats, y)          # heads only
    result = run(model, train, val, cfg, key=...)       # the whole schedule, checkpointed
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint as ckpt
from .data import batches, normalize
from .heads import Heads, head_scores, init_heads
from .masks import flatten_masks, mask_points, total_kernels
from .models import MaskedCNN

__all__ = [
    "GradSplitterConfig",
    "GradSplitterState",
    "Heads",
    "SearchDivergedError",
    "binarize",
    "init_heads",
    "head_scores",
    "phase_schedule",
    "phase_lr",
    "resolve_chunk",
    "init",
    "reset_optimizer",
    "loss_fn",
    "modularity_step",
    "head_step",
    "head_step_plain",
    "module_features",
    "masked_logits",
    "features_for_dataset",
    "composed_scores",
    "run",
    "SearchResult",
    "select_epoch",
]

MOD, HEAD = 1, 0


class SearchDivergedError(FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is left intact."""


@dataclasses.dataclass(frozen=True)
class GradSplitterConfig:
    """Hyper-parameters; defaults are the reference's (``--epoch_strategy 5,140`` etc.)."""

    alpha: float = 0.1
    head_epochs: int = 5
    modularity_epochs: int = 140  # split into cycles of (cycle_mod modularity, cycle_head head)
    cycle_mod: int = 5
    cycle_head: int = 2
    lr_head: float = 0.01
    lr_modularity: float = 0.001
    batch_size: int = 64
    init: str = "ones"  # ones | random | zeros
    seed: int = 0
    eval_batch_size: int = 256
    select_tolerance: float = 0.01  # accuracy loss allowed when selecting the epoch
    dedupe_features: bool = True  # compute modules with identical masks once (head phases)
    # modules per vmapped group inside the one jitted step: 0 = auto (all N in one vmap on
    # GPU/TPU; groups of 2 on the CPU, where one vmap over 10 modules makes a 640-image batch
    # whose activations fall out of cache: measured 1.7x slower, see the README)
    module_chunk: int = 0

    def __post_init__(self):
        if self.init not in ("ones", "random", "zeros"):
            raise ValueError(f"init must be ones, random or zeros, got {self.init!r}")
        if self.head_epochs < 0 or self.modularity_epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.cycle_mod < 1 or self.cycle_head < 0:
            raise ValueError("cycle_mod must be >= 1 and cycle_head >= 0")


def phase_schedule(cfg: GradSplitterConfig) -> list[int]:
    """Phase of every epoch: 0 = head, 1 = modularity (reference: [0]*5 + [1]*5+[0]*2 ...)."""
    cycle = [MOD] * cfg.cycle_mod + [HEAD] * cfg.cycle_head
    return [HEAD] * cfg.head_epochs + cycle * (cfg.modularity_epochs // len(cycle))


def phase_lr(cfg: GradSplitterConfig, epoch: int, phase: int) -> float:
    """Adam learning rate of the phase starting at ``epoch``."""
    if phase == MOD:
        return cfg.lr_modularity
    return cfg.lr_head if epoch < cfg.head_epochs else cfg.lr_head * 0.1


# ---------------------------------------------------------------------------- pieces
@jax.custom_vjp
def binarize(m: jax.Array) -> jax.Array:
    """Strict step ``(m > 0)`` as float; gradient: the incoming gradient clipped to [-1, 1]."""
    return (m > 0).astype(m.dtype)


def _binarize_fwd(m):
    return binarize(m), None


def _binarize_bwd(_, g):
    return (jnp.clip(g, -1.0, 1.0),)


binarize.defvjp(_binarize_fwd, _binarize_bwd)


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


def resolve_chunk(cfg: GradSplitterConfig, num_modules: int) -> int:
    """Modules per vmapped group (``cfg.module_chunk``; 0 = backend default)."""
    if cfg.module_chunk > 0:
        return min(cfg.module_chunk, num_modules)
    return min(2, num_modules) if jax.default_backend() == "cpu" else num_modules


def masked_logits(model, masks_bin, x, chunk=None):
    """[N, B, K]: the frozen model's logits under each module's binary masks.

    One ``jax.vmap`` over the modules; with ``chunk`` < N the modules are split into groups of
    ``chunk``, each group one vmap, all inside the same traced computation (no host loop).
    """
    n = next(iter(masks_bin.values())).shape[0]
    f = jax.vmap(lambda m: model(x, m))
    if chunk is None or chunk >= n:
        return f(masks_bin)
    return jnp.concatenate(
        [f({k: v[i : i + chunk] for k, v in masks_bin.items()}) for i in range(0, n, chunk)]
    )


def loss_fn(params, model, x, y, ratio, chunk=None):
    """(loss, (ce, kernel_term, scores [B, N])) for ``params = {"masks", "heads"}``."""
    b = {k: binarize(v) for k, v in params["masks"].items()}
    logits = masked_logits(model, b, x, chunk)  # [N, B, K]
    scores = head_scores(params["heads"], jnp.swapaxes(logits, 0, 1))
    ce = optax.softmax_cross_entropy_with_integer_labels(scores, y).mean()
    kern = flatten_masks(model, b, tied=True).mean()
    return ce + ratio * kern, (ce, kern, scores)


def _apply(state, grads):
    params = {"masks": state.masks, "heads": state.heads}
    upd, opt = _tx().update(grads, state.opt_state, params)
    params = optax.apply_updates(params, upd)
    return state._replace(
        masks=params["masks"], heads=params["heads"], opt_state=opt, step=state.step + 1
    )


@functools.partial(jax.jit, static_argnames=("chunk",))
def _mod_step(model, alpha, state, x, y, chunk=None):
    params = {"masks": state.masks, "heads": state.heads}
    (loss, (ce, kern, scores)), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model, x, y, alpha, chunk
    )
    acc = (scores.argmax(-1) == y).mean()
    return _apply(state, g), {"loss": loss, "ce": ce, "kernels": kern, "acc": acc}


def modularity_step(model, cfg, state, x, y):
    """One masks+heads Adam step on normalised images x [B, H, W, C], labels y [B]."""
    chunk = resolve_chunk(cfg, state.heads.w1.shape[0])
    return _mod_step(model, jnp.float32(cfg.alpha), state, x, y, chunk=chunk)


def _head_loss(heads, feats, y):
    scores = head_scores(heads, feats)
    return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean(), scores


@jax.jit
def _head_step(state, feats, y):
    (loss, scores), gh = jax.value_and_grad(_head_loss, has_aux=True)(state.heads, feats, y)
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
        return _head_loss(heads, feats, y)

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


def _default_chunk(n: int) -> int:
    return resolve_chunk(GradSplitterConfig(), n)


def module_features(model: MaskedCNN, masks: Mapping[str, jax.Array], x: jax.Array, chunk: int | None = None) -> jax.Array:
    """Per-module logits [B, N, K] under the binarised ``masks`` (forward only)."""
    n = next(iter(masks.values())).shape[0]
    return _features(model, {k: binarize(v) for k, v in masks.items()}, x,
                     chunk=chunk or _default_chunk(n))


def features_for_dataset(
    model: MaskedCNN,
    masks: Mapping[str, jax.Array],
    x_u8: np.ndarray,
    mean,
    std,
    batch_size: int = 256,
    dedupe: bool = True,
    chunk: int | None = None,
) -> np.ndarray:
    """Module features [n, N, K] for uint8 images, computing modules with equal masks once.

    Unique binary mask sets are padded to a power of two (bounded recompiles). ``chunk``:
    modules per vmapped group (default: the backend default of ``resolve_chunk``).
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
    out = []
    for i in range(0, len(x_u8), batch_size):
        xb = normalize(jnp.asarray(x_u8[i : i + batch_size]), mean, std)
        out.append(np.asarray(_features(model, uniq, xb, chunk=chunk or _default_chunk(padded))))
    feats = np.concatenate(out) if out else np.zeros((0, padded, model.num_classes), np.float32)
    return feats[:, inverse]


def composed_scores(heads: Heads, feats: np.ndarray) -> np.ndarray:
    """Scores [n, N] of the composed modules from features [n, N, K]."""
    return np.asarray(_scores_jit(heads, jnp.asarray(feats)))


_scores_jit = jax.jit(head_scores)


# ---------------------------------------------------------------------------- driver
@dataclasses.dataclass
class SearchResult:
    """Outcome of ``run``.

    history: one record per epoch (phase, loss, val_accuracy, mean kept kernels, retention);
    masks_history: ``{point: bool [E, N, C]}`` binarised masks after every epoch;
    heads_history: ``Heads`` stacked over epochs ([E, ...]).
    """

    state: GradSplitterState
    history: list[dict]
    masks_history: dict
    heads_history: Heads
    base_val_accuracy: float
    search_seconds: float


def _cfg_json(cfg):
    return dataclasses.asdict(cfg)


def select_epoch(history: list[dict], base_val_accuracy: float, tolerance: float = 0.01) -> int:
    """The reference's rule: among epochs whose validation accuracy lost less than
    ``tolerance`` (absolute) against the base model, the one with the fewest kernels (later
    epoch on ties); if none qualifies, the most accurate epoch."""
    ok = [h for h in history if h["val_accuracy"] > base_val_accuracy - tolerance]
    if ok:
        return min(ok, key=lambda h: (h["mean_kernels"], -h["epoch"]))["epoch"]
    return max(history, key=lambda h: (h["val_accuracy"], h["epoch"]))["epoch"]


def run(
    model: MaskedCNN,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    mean,
    std,
    cfg: GradSplitterConfig = GradSplitterConfig(),
    *,
    key: jax.Array | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, int, dict], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> SearchResult:
    """Run the whole schedule.

    Args:
      model: the trained base model (frozen: used in inference mode).
      train, val: (uint8 images [n, 32, 32, C], int labels [n]).
      mean, std: the dataset's normalisation.
      key: PRNG key (default ``jax.random.key(cfg.seed)``).
      out_dir: checkpoint every epoch to ``out_dir/search`` (+ ``search.json``,
        ``search_history.npz``); ``resume=True`` continues from there bit-identically.
      on_step: ``(epoch, step, steps_in_epoch, metrics)``; on_epoch: ``(epoch, record)``.

    Raises:
      SearchDivergedError: a NaN/inf loss; the previous epoch's checkpoint is kept.
    """
    x_tr, y_tr = train
    x_va, y_va = val
    if len(x_tr) == 0 or len(x_va) == 0:
        raise ValueError("GradSplitter needs non-empty training and validation splits")
    for y in (y_tr, y_va):
        if y.min() < 0 or y.max() >= model.num_classes:
            raise ValueError(f"labels must lie in [0, {model.num_classes}), got [{y.min()}, {y.max()}]")
    key = jax.random.key(cfg.seed) if key is None else key
    phases = phase_schedule(cfg)
    mean_j, std_j = jnp.asarray(mean), jnp.asarray(std)
    x_tr_dev = jnp.asarray(x_tr)
    y_tr_dev = jnp.asarray(y_tr, jnp.int32)
    ktot = total_kernels(model)
    out_dir = Path(out_dir) if out_dir else None

    ones = {p.name: jnp.ones((1, p.size)) for p in mask_points(model)}
    base_feats = features_for_dataset(model, ones, x_va, mean, std, cfg.eval_batch_size)
    base_val_acc = float((base_feats[:, 0].argmax(-1) == y_va).mean())

    state = init(key, model, cfg)
    history: list[dict] = []
    mh: dict[str, list] = {p.name: [] for p in mask_points(model)}
    hh: list[Heads] = []
    start, elapsed = 0, 0.0
    if resume:
        if out_dir is None:
            raise ValueError("resume=True needs out_dir")
        prog = ckpt.read_progress(out_dir, "search.json", _cfg_json(cfg))
        state = ckpt.load_tree(out_dir / "search", state)
        history, elapsed = prog["history"], prog["search_seconds"]
        start = len(history)
        with np.load(out_dir / "search_history.npz") as z:
            for k in mh:
                mh[k] = list(z[f"mask_{k}"])
            hh = [Heads(*(z[f"head_{f}"][e] for f in Heads._fields)) for e in range(start)]
    t_start = time.perf_counter() - elapsed

    @jax.jit
    def gather(idx):
        return normalize(x_tr_dev[idx], mean_j, std_j), y_tr_dev[idx]

    feats_tr = None  # cached train features while masks are frozen
    feats_va = None
    for epoch in range(start, len(phases)):
        phase = phases[epoch]
        if epoch == 0 or phases[epoch - 1] != phase:  # fresh Adam at every phase change
            state = reset_optimizer(state, phase_lr(cfg, epoch, phase))
        key, k_epoch = jax.random.split(state.key)
        state = state._replace(key=key)
        order = list(batches(len(y_tr), cfg.batch_size, key=k_epoch))
        metrics = []
        if phase == HEAD and feats_tr is None:
            feats_tr = jnp.asarray(
                features_for_dataset(model, state.masks, x_tr, mean, std, cfg.eval_batch_size,
                                     cfg.dedupe_features, resolve_chunk(cfg, model.num_classes))
            )
        for s, idx in enumerate(order):
            idx = jnp.asarray(idx)
            if phase == MOD:
                xb, yb = gather(idx)
                state, m = modularity_step(model, cfg, state, xb, yb)
            else:
                state, m = head_step(cfg, state, feats_tr[idx], y_tr_dev[idx])
            loss = float(m["loss"])
            if not np.isfinite(loss):
                raise SearchDivergedError(
                    f"GradSplitter loss became {loss} at epoch {epoch}, step {s}; "
                    f"the last good checkpoint (epoch {epoch - 1}) is intact"
                    + (f" in {out_dir}" if out_dir else "")
                )
            metrics.append(m)
            if on_step is not None:
                on_step(epoch, s, len(order), {k: float(v) for k, v in m.items()})
        if phase == MOD:
            feats_tr = None
            feats_va = None
        if feats_va is None:
            feats_va = features_for_dataset(model, state.masks, x_va, mean, std, cfg.eval_batch_size,
                                            cfg.dedupe_features, resolve_chunk(cfg, model.num_classes))
        scores = composed_scores(state.heads, feats_va)
        val_acc = float((scores.argmax(-1) == y_va).mean())
        bin_masks = {k: np.asarray(v > 0) for k, v in state.masks.items()}
        kept = sum(bin_masks[p.name].sum(-1) * len(p.layers) for p in mask_points(model))
        elapsed = time.perf_counter() - t_start
        rec = {
            "epoch": epoch,
            "phase": "modularity" if phase == MOD else "head",
            "loss": float(np.mean([float(m["loss"]) for m in metrics])),
            "ce": float(np.mean([float(m["ce"]) for m in metrics])),
            "train_accuracy": float(np.mean([float(m["acc"]) for m in metrics])),
            "val_accuracy": val_acc,
            "mean_kernels": float(kept.mean()),
            "mean_retention": float(kept.mean() / ktot),
            "lr": float(state.opt_state.hyperparams["learning_rate"]),
            "seconds": elapsed,
        }
        history.append(rec)
        for k in mh:
            mh[k].append(bin_masks[k])
        hh.append(jax.tree.map(np.asarray, state.heads))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            _save_history(out_dir / "search_history.npz", mh, hh)
            ckpt.save_tree(out_dir / "search", state)
            ckpt.write_json(
                out_dir / "search.json",
                {"history": history, "search_seconds": elapsed, "config": _cfg_json(cfg),
                 "base_val_accuracy": base_val_acc},
            )
        if on_epoch is not None:
            on_epoch(epoch, rec)

    masks_history = {k: np.stack(v) if v else np.zeros((0,)) for k, v in mh.items()}
    heads_history = Heads(*(np.stack([getattr(h, f) for h in hh]) for f in Heads._fields)) if hh else None
    return SearchResult(state, history, masks_history, heads_history, base_val_acc,
                        time.perf_counter() - t_start)


def _save_history(path: Path, mh, hh):
    arrays = {f"mask_{k}": np.stack(v) for k, v in mh.items()}
    for f in Heads._fields:
        arrays[f"head_{f}"] = np.stack([getattr(h, f) for h in hh])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
