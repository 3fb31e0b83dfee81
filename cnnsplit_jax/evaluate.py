"""Evaluation of a module set, whatever its kind: per-module precision / recall / F1 of the
modules' binary decisions, composed vs base accuracy (top-1 and top-5), agreement with the
model, the Jaccard index between modules, and the kind's structure (kernel retention and
FLOPs of extracted modules; or module size and active positions).

Module outputs come from ``modules.forward.module_outputs`` (the same forward a composition
runs); the composed prediction applies the kind's rule (argmax of the scores, or Pan &
Rajan's vote for concern modules).
"""

from __future__ import annotations

import numpy as np

from . import mesh as meshlib
from .modules.forward import FORWARD_FORMS, module_outputs
from .train import predict

__all__ = [
    "binary_metrics",
    "module_f1",
    "module_prf",
    "classification_report",
    "composed_scores",
    "jaccard_matrix",
    "mean_defined",
    "topk_accuracy",
    "evaluate_module_set",
]


def binary_metrics(pred: np.ndarray, truth: np.ndarray,
                   undefined: float | None = None) -> tuple[float | None, float | None, float | None]:
    """Precision, recall, F1 of boolean predictions. Where a value is undefined (precision:
    no positive prediction; recall: no positive image; F1: either, or precision + recall = 0,
    all 0/0 in the reference's arithmetic) it is ``undefined``: ``None`` (the default; JSON
    ``null``, printed "undefined") in reports, NaN where a choice must skip it (the
    reference's ``nanargmax``). Never 0: a module that never fires is not a module with F1 0."""
    tp, n_pred, n_true = float(np.sum(pred & truth)), float(np.sum(pred)), float(np.sum(truth))
    p = tp / n_pred if n_pred else undefined
    r = tp / n_true if n_true else undefined
    f1 = 2 * p * r / (p + r) if n_pred and n_true and p + r > 0 else undefined
    return p, r, f1


def module_prf(positive: np.ndarray, y: np.ndarray) -> list[tuple[float, float, float]]:
    """(precision, recall, F1) of each module's decision ``positive[:, c]`` (class c vs rest)
    against labels ``y`` (any label not in 0..N-1: a negative image)."""
    return [binary_metrics(positive[:, c], y == c) for c in range(positive.shape[1])]


def module_f1(ms, x_u8: np.ndarray, y: np.ndarray, undefined: float = float("nan")) -> np.ndarray:
    """F1 [N] of each module's binary decision (class c vs rest) on labelled images; labels
    are the module set's class indices (-1 or any other value: a negative image); an
    undefined F1 is ``undefined`` (NaN by default)."""
    _, pos = module_outputs(ms, x_u8)
    return np.asarray([binary_metrics(pos[:, c], y == c, undefined)[2] for c in range(pos.shape[1])])


def composed_scores(ms, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Scores whose argmax is the composition of all modules of ``ms`` (the kind's rule)."""
    combine = FORWARD_FORMS[ms.forward_form("masked")].combine
    return scores if combine is None else np.asarray(combine(scores, positive))


def classification_report(pred: np.ndarray, truth: np.ndarray, class_names) -> dict:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix [true, pred]."""
    k = len(class_names)
    pred, truth = np.asarray(pred), np.asarray(truth)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (truth, pred), 1)
    prf = [binary_metrics(pred == c, truth == c) for c in range(k)]
    return {
        "accuracy": float((pred == truth).mean()) if len(truth) else 0.0,
        "class_names": [str(c) for c in class_names],
        "precision": [p for p, _, _ in prf],
        "recall": [r for _, r, _ in prf],
        "f1": [f for _, _, f in prf],
        "confusion": cm.tolist(),
        "images": int(len(truth)),
    }


def mean_defined(values) -> float | None:
    """Mean of the defined entries of ``values`` (``None`` / NaN: undefined, skipped); ``None``
    when none is defined."""
    v = [float(x) for x in values if x is not None and not np.isnan(x)]
    return float(np.mean(v)) if v else None


def jaccard_matrix(ms) -> np.ndarray:
    """[N, N] Jaccard index between the modules' kept sets (``ms.active_sets()``: kept kernels,
    tied layers per layer; or active node positions)."""
    a = ms.active_sets().astype(np.float64)
    inter = a @ a.T
    sizes = a.sum(-1)
    union = sizes[:, None] + sizes[None, :] - inter
    return inter / np.maximum(union, 1)


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (ties: lower index first)."""
    scores, y = np.asarray(scores), np.asarray(y)
    if len(y) == 0:
        return 0.0
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(-1).mean())


def evaluate_module_set(ms, eval_split: tuple[np.ndarray, np.ndarray], test_split: tuple[np.ndarray, np.ndarray],
                        info, *, flops: bool = True, mesh=None) -> dict:
    """All metrics of a module set as a JSON-ready dict.

    eval_split: images / labels for module precision / recall / F1 (the reference: first 20%
    of the test set); test_split: images / labels for composed vs base accuracy (last 80%);
    ``whole_test_set``: those accuracies on both splits together.
    info: ``DatasetInfo`` of the base model's data (its normalisation). mesh: devices the
    modules' batches are split over (``mesh.make_mesh`` spec, axis ``data``, or a ``Mesh``;
    None: every device on ``data``).
    """
    mesh = meshlib.resolve_data(mesh)
    xe, ye = eval_split
    xt, yt = test_split
    # one pass over both splits: one compiled batch shape instead of one per split size
    prob_all, pos_all = module_outputs(ms, np.concatenate([xe, xt]), mesh=mesh)
    pos_e, pos = pos_all[:len(xe)], pos_all[len(xe):]
    prf = module_prf(pos_e, ye)
    scores_all = composed_scores(ms, prob_all, pos_all)
    logits_all = predict(ms.base, np.concatenate([xe, xt]), info)
    scores, logits = scores_all[len(xe):], logits_all[len(xe):]
    jac = jaccard_matrix(ms)
    off = jac[~np.eye(len(jac), dtype=bool)]
    out = {
        **_costs(logits, scores, yt),
        "agreement_with_model": float((scores.argmax(-1) == logits.argmax(-1)).mean()),
        "single_positive_fraction": float((pos.sum(-1) == 1).mean()),
        "module_precision": [p for p, _, _ in prf],
        "module_recall": [r for _, r, _ in prf],
        "module_f1": [f for _, _, f in prf],
        "mean_module_f1": mean_defined(f for _, _, f in prf),
        "undefined_module_f1": sum(f is None for _, _, f in prf),
        "jaccard": jac.tolist(),
        "mean_jaccard": float(off.mean()) if off.size else 1.0,
        **ms.structure(flops=flops),
        "eval_images": int(len(ye)),
        "test_images": int(len(yt)),
        # the same on the whole test set (both splits; Pan & Rajan measure their cost there)
        "whole_test_set": {**_costs(logits_all, scores_all, np.concatenate([ye, yt])),
                           "images": int(len(ye) + len(yt))},
    }
    return out


def _costs(logits: np.ndarray, scores: np.ndarray, y: np.ndarray) -> dict:
    """Base and composed top-1 / top-5 accuracy on labels ``y`` and the decomposition's cost
    (``accuracy_loss`` / ``top5_loss``: base minus composed)."""
    base, composed = float((logits.argmax(-1) == y).mean()), float((scores.argmax(-1) == y).mean())
    b5, c5 = topk_accuracy(logits, y, 5), topk_accuracy(scores, y, 5)
    return {"base_accuracy": base, "composed_accuracy": composed, "base_top5": b5, "composed_top5": c5,
            "accuracy_loss": base - composed, "top5_loss": b5 - c5}
