"""Reuse scenarios of the papers, built on ``compose``: a more accurate model, a new task,
patching a weak model, replacing a module.

* ``compose_task``: for every class of a ``data.Task`` pick, among candidate module sets of
  that class's dataset, the module with the best F1 on the task's module-evaluation images
  (the reference's ``nanargmax(F1)``), compose them and report accuracy / per-class P, R, F1 /
  confusion on the task's test images, next to every source model and every source's own
  modules. One dataset and several models = the *accurate model* scenario (GradSplitter 4.1);
  classes of several datasets = the *new task* scenario (4.2), where ``train_from_scratch``
  gives the baseline.
* ``patch``: CNNSplitter's protocol (cnnsplitter.md 1c.3): the weak model's softmax for the
  non-target classes plus the target-class module's score min-max normalised on the module's
  own target-class images; target-class precision / recall / F1 and non-target accuracy,
  before and after.
* ``replace``: swap one class's module for another model's and report the change.
* ``continuous_learning``: Pan & Rajan's re-run of tangling identification for concern
  modules composed across datasets (each module sees the other datasets' classes as
  negatives; nothing is trained).

All functions return JSON-ready dicts; none prints.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Sequence

import jax
import numpy as np

from .compose import Pick, compose, predict_scores
from .data import Task
from .evaluate import binary_metrics, classification_report, module_f1
from .modules.module_set import ModuleSet
from .progress import RunWarning
from .splitters.concern import retangle
from .train import predict

__all__ = [
    "Source",
    "candidate_f1",
    "select_picks",
    "evaluate_picks",
    "compose_task",
    "train_from_scratch",
    "patch_scores",
    "patch",
    "replace",
    "continuous_learning",
]


class Source:
    """A module set offered to a composition: ``label`` for reports, optional ``classes``
    (its module indices it may contribute; default all).

    ``origins[c]`` = ``(dataset, class)`` that module c recognises: the module set's
    ``meta["sources"]`` (models trained on a task spec) or ``(meta["dataset"], c)``.
    """

    def __init__(self, label: str, module_set: ModuleSet, classes: Sequence[int] | None = None):
        self.label = label
        self.module_set = module_set
        n = module_set.num_modules
        self.classes = tuple(range(n)) if classes is None else tuple(int(c) for c in classes)
        bad = [c for c in self.classes if not 0 <= c < n]
        if bad:
            raise ValueError(f"{label}: unknown class index {bad}; the module set has classes 0..{n - 1}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{label}: classes {list(self.classes)} name a class more than once")
        meta = module_set.meta
        src = meta.get("sources")
        if src:
            self.origins = tuple((str(d), int(c)) for d, c in src)
        else:
            self.origins = tuple((str(meta.get("dataset", "")), c) for c in range(n))
        if len(self.origins) != n:
            raise ValueError(f"{label}: {len(self.origins)} class sources for {n} modules")

    @property
    def dataset(self) -> str:
        return str(self.module_set.meta.get("dataset", ""))


def _task_label_of(task: Task, origin: tuple[str, int]) -> int | None:
    for t, o in enumerate(task.sources):
        if tuple(o) == tuple(origin):
            return t
    return None


def candidate_f1(sources: Sequence[Source], task: Task) -> dict[tuple[int, int], float]:
    """F1 of module c of every source on the task's evaluation images, keyed (source, task
    label); only modules whose (dataset, class) belongs to the task are scored. An undefined
    F1 (e.g. a module that never says "positive") is NaN: ``select_picks`` skips it."""
    out = {}
    for si, s in enumerate(sources):
        labels = {c: _task_label_of(task, s.origins[c]) for c in s.classes}
        labels = {c: t for c, t in labels.items() if t is not None}
        if not labels:
            continue
        local = np.full(task.ds.info.num_classes, -1)  # task label -> module index
        for c, t in labels.items():
            local[t] = c
        f1 = module_f1(s.module_set, task.x_eval, local[task.y_eval], undefined=float("nan"))
        for c, t in labels.items():
            out[(si, t)] = float(f1[c])
    return out


def select_picks(sources: Sequence[Source], task: Task, f1: dict | None = None) -> tuple[list[Pick], list[int]]:
    """Best-F1 module per task class, as the reference's ``nanargmax``: undefined F1s are
    skipped, ties go to the earlier source. Where every candidate's F1 is undefined (none says
    "positive" on the evaluation images) the earliest source's module is taken, with a
    ``RunWarning``. Returns (picks, source index per class). Raises ValueError when a class has
    no candidate module."""
    f1 = candidate_f1(sources, task) if f1 is None else f1
    picks, chosen = [], []
    for t, (d, c) in enumerate(task.sources):
        offered = [si for si in range(len(sources)) if (si, t) in f1]
        if not offered:
            raise ValueError(f"no module for class {task.ds.info.class_names[t]!r} "
                             f"(dataset {d!r}, class {c}) among the given module sets")
        cands = [(f1[(si, t)], -si) for si in offered if not np.isnan(f1[(si, t)])]
        if not cands:
            warnings.warn(f"every module for class {task.ds.info.class_names[t]!r} has an undefined F1 on the "
                          f"{len(task.y_eval)} evaluation images (none says 'positive' on any of them, or the "
                          f"class has no evaluation image): taking source {sources[offered[0]].label!r}'s",
                          RunWarning, stacklevel=2)
            cands = [(0.0, -offered[0])]
        si = -max(cands)[1]
        module = sources[si].origins.index((d, c))
        picks.append(Pick(sources[si].module_set, module, sources[si].label, task.ds.info.class_names[t]))
        chosen.append(si)
    return picks, chosen


def evaluate_picks(picks: Sequence[Pick], task: Task, **compose_kwargs) -> dict:
    """Classification report of the composition of ``picks`` on the task's test images."""
    comp = compose(picks, **compose_kwargs)
    pred = predict_scores(comp, task.ds.x_test).argmax(-1)
    return classification_report(pred, task.ds.y_test, task.ds.info.class_names)


def _base_accuracy(s: Source, task: Task) -> float | None:
    """Accuracy of a source's base model on the task (argmax over the task's classes), when
    the model knows every task class; else None."""
    if any(tuple(o) not in s.origins for o in task.sources):
        return None
    ms = s.module_set
    cols = [s.origins.index(tuple(o)) for o in task.sources]
    logits = predict(ms.base, task.ds.x_test, ms.normalization)[:, cols]
    return float((logits.argmax(-1) == task.ds.y_test).mean())


def compose_task(sources: Sequence[Source], task: Task, **compose_kwargs) -> tuple[dict, list[Pick]]:
    """Best-F1 composition for ``task`` and its comparison with every source (see module doc).

    Returns (JSON-ready report, the chosen picks)."""
    t0 = time.perf_counter()
    f1 = candidate_f1(sources, task)
    picks, chosen = select_picks(sources, task, f1)
    comp = compose(picks, **compose_kwargs)
    compose_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = predict_scores(comp, task.ds.x_test).argmax(-1)
    eval_seconds = time.perf_counter() - t1
    report = classification_report(pred, task.ds.y_test, task.ds.info.class_names)
    per_source = []
    for si, s in enumerate(sources):
        rec = {"source": s.label, "dataset": s.dataset, "base_accuracy": _base_accuracy(s, task)}
        own = [Pick(s.module_set, s.origins.index(tuple(o)), s.label) for o in task.sources
               if tuple(o) in s.origins and s.origins.index(tuple(o)) in s.classes]
        if len(own) == len(task.sources):  # this source alone covers the task
            rec["modules_accuracy"] = evaluate_picks(own, task, **compose_kwargs)["accuracy"]
        per_source.append(rec)
    return {
        **report,
        "num_sources": len(sources),
        "chosen": [{"class": task.ds.info.class_names[t], "source": sources[si].label,
                    "dataset": d, "dataset_class": c, "module": picks[t].source_class,
                    "f1": f1[(si, t)]}
                   for t, ((d, c), si) in enumerate(zip(task.sources, chosen))],
        "candidate_f1": {sources[si].label: {task.ds.info.class_names[t]: (None if np.isnan(v) else v)
                                             for (sj, t), v in f1.items() if sj == si}
                         for si in range(len(sources))},
        "sources": per_source,
        "compose_seconds": compose_seconds,
        "eval_seconds": eval_seconds,
        "eval_images": int(len(task.y_eval)),
    }, picks


def train_from_scratch(task: Task, arch: str, width: float, cfg, *, key=0, **model_kwargs) -> dict:
    """The new-task baseline: ``arch`` trained from scratch on the task's training images
    (``train.fit`` with ``cfg``); accuracy on the task's test images and training seconds."""
    from .models import build_model
    from .train import accuracy, fit

    model = build_model(arch, num_classes=task.ds.info.num_classes, in_channels=task.ds.info.channels,
                        width=width, key=key, **model_kwargs)
    t0 = time.perf_counter()
    res = fit(model, task.ds, cfg)
    seconds = time.perf_counter() - t0
    return {"accuracy": accuracy(res.model, task.ds.x_test, task.ds.y_test, task.ds.info),
            "train_seconds": seconds, "best_epoch": res.best_epoch, "epochs": cfg.epochs,
            "model": arch, "width": width}


# -------------------------------------------------------------------------------- patch
def patch_scores(weak_probs: np.ndarray, module_score: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The reference's patched scores [n, K]: ``[softmax[:, :-1], (m - lo) / (hi - lo)]``."""
    if not hi > lo:
        raise ValueError(f"module score range on its target-class images is empty ({lo}, {hi})")
    m = (np.asarray(module_score, np.float64) - lo) / (hi - lo)
    return np.concatenate([np.asarray(weak_probs)[:, :-1], m[:, None]], axis=1)


def _tc_metrics(pred, y, tc):
    p, r, f = binary_metrics(pred == tc, y == tc)
    non = y != tc
    return {"precision": p, "recall": r, "f1": f,
            "accuracy": float((pred[non] == y[non]).mean()) if non.any() else 0.0,
            "overall_accuracy": float((pred == y).mean())}


def patch(weak_model, weak_info, x_test: np.ndarray, y_test: np.ndarray, module_set: ModuleSet,
          target_class: int, range_images: np.ndarray, *, mesh=None) -> dict:
    """Patch ``weak_model`` (whose *last* class is the target class) with module
    ``target_class`` of ``module_set``.

    Args:
      weak_info: ``DatasetInfo`` of the weak model (normalisation, class names).
      x_test, y_test: the weak model's test images (uint8) and labels (target class = last).
      range_images: the module's own target-class images (uint8), e.g. of its module-set's
        evaluation split; their min / max module score normalise the module's output.
      mesh: devices the module's batches are split over (``compose``'s ``mesh``).

    Returns ``{"before", "after"}`` each with the target class's ``precision, recall, f1``,
    ``accuracy`` on the non-target images and ``overall_accuracy``; plus the score range and
    confusion matrices.
    """
    k = weak_model.num_classes
    if len(range_images) == 0:
        raise ValueError("no target-class images to take the module's score range from")
    if weak_model.in_channels != module_set.base.in_channels:
        raise ValueError(f"weak model reads {weak_model.in_channels}-channel images, the module "
                         f"{module_set.base.in_channels}-channel ones")
    if len(y_test) and (y_test.min() < 0 or y_test.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}) for the weak model")
    comp = compose([Pick(module_set, int(target_class))], mesh=mesh)
    rng = predict_scores(comp, range_images)[:, 0]
    lo, hi = float(rng.min()), float(rng.max())
    logits = predict(weak_model, x_test, weak_info)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    before = probs.argmax(-1)
    after = patch_scores(probs, predict_scores(comp, x_test)[:, 0], lo, hi).argmax(-1)
    tc = k - 1
    names = list(weak_info.class_names)
    return {
        "target_class": names[tc] if names else tc,
        "module_class": int(target_class),
        "module_score_range": [lo, hi],
        "range_images": int(len(range_images)),
        "before": _tc_metrics(before, y_test, tc),
        "after": _tc_metrics(after, y_test, tc),
        "confusion_before": classification_report(before, y_test, names)["confusion"],
        "confusion_after": classification_report(after, y_test, names)["confusion"],
        "test_images": int(len(y_test)),
    }


def replace(picks: Sequence[Pick], column: int, new: Pick, task: Task, **compose_kwargs) -> dict:
    """Swap the module of composed class ``column`` for ``new`` and report both compositions."""
    if not 0 <= column < len(picks):
        raise ValueError(f"column {column} out of range for {len(picks)} composed classes")
    before = evaluate_picks(picks, task, **compose_kwargs)
    swapped = list(picks)
    swapped[column] = new._replace(name=new.name or picks[column].name)
    after = evaluate_picks(swapped, task, **compose_kwargs)
    return {
        "column": column,
        "class": task.ds.info.class_names[column],
        "old_source": picks[column].source,
        "new_source": new.source,
        "before": before,
        "after": after,
        "accuracy_change": after["accuracy"] - before["accuracy"],
        "f1_change": (None if after["f1"][column] is None or before["f1"][column] is None
                      else after["f1"][column] - before["f1"][column]),
    }


# ------------------------------------------------------------------ continuous learning
def continuous_learning(picks: Sequence[Pick], task: Task, *, ratio: float = 1.0,
                        key: jax.Array | None = None) -> list[Pick]:
    """Picks whose concern modules re-ran tangling identification against the task classes
    their model never saw (spec field-survey.md §1.7; the paper's "MMA").

    ``picks[k]`` is the module of task label k (as ``compose_task`` returns them). For a
    concern module of label k, the negatives are task training images of the labels that its
    base model was not trained on (other datasets' classes, or classes of another model of
    the same dataset): ``ratio`` x the label's own training-image count, spread evenly over
    those labels, each read with the module's own normalisation. Positions they activate are
    restored (``concern.retangle``); MC-BLN removals stay. Other picks are returned as given.
    """
    if len(picks) != len(task.sources):
        raise ValueError(f"{len(picks)} picks for a task of {len(task.sources)} classes")
    key = jax.random.key(0) if key is None else key
    y = np.asarray(task.ds.y_train)
    out = []
    for k, p in enumerate(picks):
        ms = p.module_set
        seen = set(Source("", ms).origins)
        others = [t for t, o in enumerate(task.sources) if tuple(o) not in seen]
        if not ms.retangles or not others:
            out.append(p)
            continue
        want = int(round(ratio * int((y == k).sum())))
        per = max(1, -(-want // len(others)))
        idx = []
        for t in others:
            key, sub = jax.random.split(key)
            cand = np.flatnonzero(y == t)
            idx.append(np.asarray(jax.random.permutation(sub, cand))[:per])
        idx = np.concatenate(idx)[:want] if want else np.zeros(0, np.int64)
        c = int(p.source_class)
        mean, std = ms.normalization
        new = retangle(ms.base, {n: v[c:c + 1] for n, v in ms.inactive.items()}, ms.removed[c:c + 1],
                       task.ds.x_train[idx], mean, std, residual=ms.residual)
        inactive = {n: v.copy() for n, v in ms.inactive.items()}
        for n in inactive:
            inactive[n][c] = new[n][0]
        meta = {**ms.meta, "continuous_learning": {"module": c, "negatives": int(len(idx))}}
        out.append(p._replace(module_set=dataclasses.replace(ms, inactive=inactive, meta=meta)))
    return out
