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
from ...models import kept_kernels, mask_points, total_kernels
from ...models.protocol import SplittableModel
from ...models.protocol import KERNEL_MASKS, require
from ...modules.heads import Heads
from ...modules.module_set import ModuleSet
from ...progress import Progress, callbacks_of, notify
from ..base import SearchDivergedError, SplitData, SplitResult, check_data, resume_identity
from .config import HEAD, MOD, GradSplitterConfig, phase_lr, phase_schedule
from .step import (feature_head_scores, features_for_dataset, head_step, init, modularity_step, place,
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
    if len(data.x_train) == 0 or len(data.x_val) == 0:
        raise ValueError("GradSplitter needs non-empty training and validation splits")
    check_data(data, model.num_classes)
    cbs, phases, n = callbacks_of(callbacks), phase_schedule(cfg), model.num_classes
    mesh = meshlib.resolve(mesh)
    ones = {p.name: jnp.ones((1, p.size)) for p in mask_points(model)}
    base_val_acc = float((features_for_dataset(model, ones, data.x_val, data.mean, data.std,
                                               cfg.eval_batch_size)[:, 0].argmax(-1) == data.y_val).mean())
    state = init(key, model, cfg)
    hist = _history_tree(model, 0)
    loop = ckpt.ResumableLoop(ckpt_dir, CKPT, ckpt.config_json(cfg), resume_identity(model, data, identity),
                              seconds_key="search_seconds")
    if resume:
        if ckpt_dir is None:
            raise ValueError("resume=True needs ckpt_dir")
        tree = loop.resume(lambda p: {"state": state, **_history_tree(model, len(p["history"]))})
        state, hist = tree["state"], jax.tree.map(np.asarray, {"masks": tree["masks"], "heads": tree["heads"]})
    state = place(state, mesh)
    t_start = time.perf_counter() - loop.seconds
    run = _Epochs(model, data, cfg, mesh, cbs, phases, ckpt_dir)
    for epoch in range(loop.done, len(phases)):
        state, metrics = run.train(state, epoch)
        val_acc = run.validate(state)
        bin_masks = {k: dist.host(v[:n] > 0) for k, v in state.masks.items()}
        loop.seconds = time.perf_counter() - t_start
        rec = _epoch_record(model, epoch, phases[epoch], metrics, val_acc, bin_masks, state, loop.seconds)
        hist = {"masks": {k: np.concatenate([hist["masks"][k], v[None].astype(np.uint8)])
                          for k, v in bin_masks.items()},
                "heads": Heads(*(np.concatenate([a, dist.host(b)[None]]) for a, b in zip(hist["heads"], run.real(state.heads))))}
        loop.record(rec, {"state": run.saved(state), **hist}, base_val_accuracy=base_val_acc)
        notify(cbs, Progress("epoch", epoch, len(phases), metrics=rec))
    if not loop.history:
        raise ValueError("the schedule has no epoch: set head_epochs or modularity_epochs > 0")
    sel = select_epoch(loop.history, base_val_acc, cfg.select_tolerance)
    ms = ModuleSet(model, {k: v[sel].astype(np.float32) for k, v in hist["masks"].items()},
                   Heads(*(np.asarray(h[sel]) for h in hist["heads"])),
                   {"method": "grad", "normalization": data.normalization.to_json(), "selected_epoch": sel,
                    "config": loop.config})
    return SplitResult(ms, loop.history, time.perf_counter() - t_start, {
        "state": run.saved(state), "masks_history": {k: v.astype(bool) for k, v in hist["masks"].items()},
        "heads_history": hist["heads"], "base_val_accuracy": base_val_acc, "selected_epoch": sel})


class _Epochs:
    """One epoch of the schedule: the steps of its phase (modularization: masks and heads on
    image batches; head: heads on features cached while the masks stay frozen) and the
    validation accuracy of the composed heads."""

    def __init__(self, model, data: SplitData, cfg: GradSplitterConfig, mesh, cbs, phases, ckpt_dir):
        self.model, self.data, self.cfg, self.mesh, self.cbs, self.phases = model, data, cfg, mesh, cbs, phases
        self.ckpt_dir, n = ckpt_dir, model.num_classes
        self.x_tr, self.y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train, jnp.int32)
        self.mean, self.std = jnp.asarray(data.mean), jnp.asarray(data.std)
        self.real = lambda t: jax.tree.map(lambda v: v[:n], t)
        self.saved = (lambda st: st) if mesh is None else (lambda st: unplace(st, n))
        self.gather = jax.jit(lambda idx: (normalize(self.x_tr[idx], self.mean, self.std), self.y_tr[idx]))
        self.feats_tr = self.feats_va = None  # features cached while masks are frozen (head phases)

    def features(self, masks, x):
        d, c = self.data, self.cfg
        return features_for_dataset(self.model, masks, x, d.mean, d.std, c.eval_batch_size, c.dedupe_features,
                                    c.module_chunk or None, mesh=self.mesh)

    def train(self, state, epoch: int):
        """(state, per-step metrics) after epoch ``epoch``; a fresh Adam at every phase change."""
        cfg, phase, n = self.cfg, self.phases[epoch], self.model.num_classes
        if epoch == 0 or self.phases[epoch - 1] != phase:
            state = place(reset_optimizer(state, phase_lr(cfg, epoch, phase)), self.mesh)
        k_next, k_epoch = jax.random.split(state.key)
        state = state._replace(key=k_next)
        order = list(batches(len(self.data.y_train), cfg.batch_size, key=k_epoch))
        if phase == HEAD and self.feats_tr is None:
            self.feats_tr = jnp.asarray(self.features(state.masks, self.data.x_train))
        metrics = []
        for s, idx in enumerate(order):
            idx = jnp.asarray(idx)
            if phase == MOD:
                state, m = modularity_step(self.model, cfg, state, *self.gather(idx), mesh=self.mesh, n_real=n)
            else:
                state, m = head_step(cfg, state, self.feats_tr[idx], self.y_tr[idx], n_real=n)
            m = {k: float(v) for k, v in m.items()}
            if not np.isfinite(m["loss"]):
                raise SearchDivergedError(
                    f"GradSplitter loss became {m['loss']} at epoch {epoch}, step {s}; the last good "
                    f"checkpoint (epoch {epoch - 1}) is intact" + (f" in {self.ckpt_dir}" if self.ckpt_dir else ""))
            metrics.append(m)
            notify(self.cbs, Progress("step", epoch, len(self.phases), s, len(order), m))
        if phase == MOD:
            self.feats_tr = self.feats_va = None
        return state, metrics

    def validate(self, state) -> float:
        """Accuracy of the argmax of the N modules' head scores on the validation split."""
        if self.feats_va is None:
            self.feats_va = self.features(state.masks, self.data.x_val)
        n = self.model.num_classes
        scores = feature_head_scores(self.real(state.heads), self.feats_va[:, :n])
        return float((scores.argmax(-1) == self.data.y_val).mean())


def _epoch_record(model, epoch: int, phase: int, metrics: list[dict], val_acc: float, bin_masks: dict, state,
                  seconds: float) -> dict:
    """The history record of an epoch (means of its steps' metrics, kept kernels, lr)."""
    kept = kept_kernels(model, bin_masks)
    return {
        "epoch": epoch,
        "phase": "modularity" if phase == MOD else "head",
        "loss": float(np.mean([m["loss"] for m in metrics])),
        "ce": float(np.mean([m["ce"] for m in metrics])),
        "train_accuracy": float(np.mean([m["acc"] for m in metrics])),
        "val_accuracy": val_acc,
        "mean_kernels": float(kept.mean()),
        "mean_retention": float(kept.mean() / total_kernels(model)),
        "lr": float(state.opt_state.hyperparams["learning_rate"]),
        "seconds": seconds,
    }


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
