"""GradSplitter's search driver: the whole schedule, per-epoch checkpoints with bit-identical
resume, and the reference's selection of the epoch whose masks become the modules."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ... import checkpoint as ckpt
from ... import distributed as dist
from ... import mesh as meshlib
from ...data import batches, normalize
from ...models import mask_points, total_kernels
from ...models.protocol import SplittableModel
from ...models.protocol import KERNEL_MASKS, require
from ...modules.heads import Heads
from ...modules.module_set import ModuleSet
from ...progress import Progress, callbacks_of, notify
from ..base import SearchDivergedError, SplitData, SplitResult, check_data, resume_identity
from .config import HEAD, MOD, GradSplitterConfig, phase_lr, phase_schedule
from .step import (composed_scores, features_for_dataset, head_step, init, modularity_step, place,
                   reset_optimizer, unplace)

__all__ = ["split", "select_epoch", "report"]

CKPT = "search"


def select_epoch(history: list[dict], base_val_accuracy: float, tolerance: float = 0.01) -> int:
    """The reference's rule: among epochs whose validation accuracy lost less than
    ``tolerance`` (absolute) against the base model, the one with the fewest kernels (later
    epoch on ties); if none qualifies, the most accurate epoch."""
    ok = [h for h in history if h["val_accuracy"] > base_val_accuracy - tolerance]
    if ok:
        return min(ok, key=lambda h: (h["mean_kernels"], -h["epoch"]))["epoch"]
    return max(history, key=lambda h: (h["val_accuracy"], h["epoch"]))["epoch"]


def _history_tree(model: SplittableModel, epochs: int) -> dict:
    """Template of the per-epoch binary masks and heads (grows with the run)."""
    n, k = model.num_classes, model.num_classes
    return {"masks": {p.name: np.zeros((epochs, n, p.size), np.uint8) for p in mask_points(model)},
            "heads": Heads(np.zeros((epochs, n, k, 10), np.float32), np.zeros((epochs, n, 10), np.float32),
                           np.zeros((epochs, n, 10), np.float32), np.zeros((epochs, n), np.float32))}


def split(key: jax.Array, model: SplittableModel, data: SplitData, cfg: GradSplitterConfig = GradSplitterConfig(),
          *, ckpt_dir: str | Path | None = None, resume: bool = False, callbacks=None,
          mesh=None, identity: dict | None = None) -> SplitResult:
    """Run the whole schedule on ``data`` (trains on its training split, validates on its
    validation split) and return the selected epoch's modules.

    Args:
      key: PRNG key of the search (mask init, heads, epoch shuffles).
      model: the trained base model (frozen: used in inference mode).
      ckpt_dir: checkpoint every epoch to ``ckpt_dir/search`` (+ ``search.json``); with
        ``resume=True`` continue from there bit-identically: the same config, model (its
        weights' digest), data (digests of both splits) and normalisation are required, and
        the caller's ``identity`` (e.g. the base run and dataset) too; a difference is
        refused naming it.
      callbacks: ``Progress`` callbacks (stage ``"step"`` and ``"epoch"``).
      mesh: devices to split the modules over (``mesh.make_mesh`` spec or ``Mesh``; axes
        ``modules`` and ``data``); None: every device on ``modules``. Masks, heads and
        their Adam state are padded to the axis and split along it; results, history and
        checkpoints hold the real modules only (a search resumes on any mesh).

    Returns:
      ``SplitResult``: a ``ModuleSet`` (masks and heads of the epoch chosen by
      ``select_epoch``, meta ``method``, ``selected_epoch``, ``config``), the per-epoch history,
      the search seconds; details: ``state``, ``masks_history`` ``{point: bool [E, N, C]}``,
      ``heads_history`` (``Heads`` [E, ...]), ``base_val_accuracy``, ``selected_epoch``.

    Raises:
      SearchDivergedError: a NaN/inf loss; the previous epoch's checkpoint is kept.
    """
    require(model, KERNEL_MASKS, "GradSplitter", "decompose it by concern identification")
    x_tr, y_tr, x_va, y_va = data.x_train, data.y_train, data.x_val, data.y_val
    if len(x_tr) == 0 or len(x_va) == 0:
        raise ValueError("GradSplitter needs non-empty training and validation splits")
    check_data(data, model.num_classes)
    cbs = callbacks_of(callbacks)
    phases = phase_schedule(cfg)
    mean_j, std_j = jnp.asarray(data.mean), jnp.asarray(data.std)
    x_tr_dev, y_tr_dev = jnp.asarray(x_tr), jnp.asarray(y_tr, jnp.int32)
    ktot = total_kernels(model)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
    config = ckpt.config_json(cfg)
    identity = resume_identity(model, data, identity)
    mesh = meshlib.resolve(mesh)
    n = model.num_classes
    feats = lambda masks, x: features_for_dataset(  # noqa: E731
        model, masks, x, data.mean, data.std, cfg.eval_batch_size, cfg.dedupe_features,
        cfg.module_chunk or None, mesh=mesh)
    real = lambda t: jax.tree.map(lambda v: v[:n], t)  # noqa: E731
    saved = (lambda st: st) if mesh is None else (lambda st: unplace(st, n))  # noqa: E731

    ones = {p.name: jnp.ones((1, p.size)) for p in mask_points(model)}
    base_val_acc = float((features_for_dataset(model, ones, x_va, data.mean, data.std,
                                               cfg.eval_batch_size)[:, 0].argmax(-1) == y_va).mean())
    state = init(key, model, cfg)
    history: list[dict] = []
    hist = _history_tree(model, 0)
    elapsed = 0.0
    if resume:
        if ckpt_dir is None:
            raise ValueError("resume=True needs ckpt_dir")
        tree, prog = ckpt.load_progress(ckpt_dir, CKPT, lambda p: {
            "state": state, **_history_tree(model, len(p["history"]))}, config, identity)
        state, hist = tree["state"], {"masks": tree["masks"], "heads": tree["heads"]}
        hist = jax.tree.map(np.asarray, hist)
        history, elapsed = prog["history"], prog["search_seconds"]
    state = place(state, mesh)
    t_start = time.perf_counter() - elapsed

    @jax.jit
    def gather(idx):
        return normalize(x_tr_dev[idx], mean_j, std_j), y_tr_dev[idx]

    feats_tr = feats_va = None  # cached features while masks are frozen (head phases)
    for epoch in range(len(history), len(phases)):
        phase = phases[epoch]
        if epoch == 0 or phases[epoch - 1] != phase:  # fresh Adam at every phase change
            state = place(reset_optimizer(state, phase_lr(cfg, epoch, phase)), mesh)
        k_next, k_epoch = jax.random.split(state.key)
        state = state._replace(key=k_next)
        order = list(batches(len(y_tr), cfg.batch_size, key=k_epoch))
        metrics = []
        if phase == HEAD and feats_tr is None:
            feats_tr = jnp.asarray(feats(state.masks, x_tr))
        for s, idx in enumerate(order):
            idx = jnp.asarray(idx)
            if phase == MOD:
                state, m = modularity_step(model, cfg, state, *gather(idx), mesh=mesh, n_real=n)
            else:
                state, m = head_step(cfg, state, feats_tr[idx], y_tr_dev[idx], n_real=n)
            m = {k: float(v) for k, v in m.items()}
            if not np.isfinite(m["loss"]):
                raise SearchDivergedError(
                    f"GradSplitter loss became {m['loss']} at epoch {epoch}, step {s}; the last good "
                    f"checkpoint (epoch {epoch - 1}) is intact" + (f" in {ckpt_dir}" if ckpt_dir else ""))
            metrics.append(m)
            notify(cbs, Progress("step", epoch, len(phases), s, len(order), m))
        if phase == MOD:
            feats_tr = feats_va = None
        if feats_va is None:
            feats_va = feats(state.masks, x_va)
        val_acc = float((composed_scores(real(state.heads), feats_va[:, :n]).argmax(-1) == y_va).mean())
        bin_masks = {k: dist.host(v[:n] > 0) for k, v in state.masks.items()}
        kept = sum(bin_masks[p.name].sum(-1) * len(p.layers) for p in mask_points(model))
        elapsed = time.perf_counter() - t_start
        rec = {
            "epoch": epoch,
            "phase": "modularity" if phase == MOD else "head",
            "loss": float(np.mean([m["loss"] for m in metrics])),
            "ce": float(np.mean([m["ce"] for m in metrics])),
            "train_accuracy": float(np.mean([m["acc"] for m in metrics])),
            "val_accuracy": val_acc,
            "mean_kernels": float(kept.mean()),
            "mean_retention": float(kept.mean() / ktot),
            "lr": float(state.opt_state.hyperparams["learning_rate"]),
            "seconds": elapsed,
        }
        history.append(rec)
        hist = {"masks": {k: np.concatenate([hist["masks"][k], v[None].astype(np.uint8)])
                          for k, v in bin_masks.items()},
                "heads": Heads(*(np.concatenate([a, dist.host(b)[None]]) for a, b in zip(hist["heads"], real(state.heads))))}
        if ckpt_dir is not None:
            ckpt.save_progress(ckpt_dir, CKPT, {"state": saved(state), **hist}, {
                "history": history, "search_seconds": elapsed, "config": config, "identity": identity,
                "base_val_accuracy": base_val_acc})
        notify(cbs, Progress("epoch", epoch, len(phases), metrics=rec))

    if not history:
        raise ValueError("the schedule has no epoch: set head_epochs or modularity_epochs > 0")
    sel = select_epoch(history, base_val_acc, cfg.select_tolerance)
    masks = {k: v[sel].astype(np.float32) for k, v in hist["masks"].items()}
    heads = Heads(*(np.asarray(h[sel]) for h in hist["heads"]))
    norm = data.normalization.to_json()
    ms = ModuleSet(model, masks, heads, {"method": "grad", "normalization": norm, "selected_epoch": sel,
                                         "config": config})
    return SplitResult(ms, history, time.perf_counter() - t_start, {
        "state": saved(state), "masks_history": {k: v.astype(bool) for k, v in hist["masks"].items()},
        "heads_history": hist["heads"], "base_val_accuracy": base_val_acc, "selected_epoch": sel})


def report(result: SplitResult, data: SplitData) -> dict:
    """GradSplitter's fields of ``split.json``."""
    d, sel = result.details, result.details["selected_epoch"]
    return {"selected_epoch": sel, "base_val_accuracy": d["base_val_accuracy"],
            "selected_val_accuracy": result.history[sel]["val_accuracy"], "search_seconds": result.seconds,
            "epochs": len(result.history), "history": result.history, "train_images": int(len(data.y_train)),
            "val_images": int(len(data.y_val))}


def summary_line(report: dict) -> str:
    """One line under the module table of ``split.json``'s GradSplitter fields."""
    return f"selected epoch {report['selected_epoch']} of {report['epochs']}; search {report['search_seconds']:.1f}s"
