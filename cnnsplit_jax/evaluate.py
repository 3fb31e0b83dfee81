"""Evaluation of a module set: per-module precision / recall / F1, kernel retention, Jaccard
index between modules, composed accuracy vs the base model, FLOPs of extracted modules.

Scores come from the vmapped masked forward with ``effective_masks`` (the keep-one rule of
extraction), which equals the extracted modules' outputs (tests/test_extract.py).
"""

from __future__ import annotations

import numpy as np

from .concern import module_logits, module_size, positive_probability, topk_accuracy, vote, vote_scores
from .extract import effective_masks, extract_all, forward_flops
from .gradsplitter import features_for_dataset
from .heads import scores_from_logits
from .masks import flatten_masks, mask_points, total_kernels
from .module_set import ConcernModuleSet, ModuleSet
from .train import predict

__all__ = [
    "binary_metrics",
    "module_scores_for",
    "module_outputs",
    "module_f1",
    "classification_report",
    "retention",
    "jaccard_matrix",
    "evaluate_module_set",
    "concern_logits",
    "evaluate_concern_set",
]


def binary_metrics(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 of boolean predictions (0 where undefined)."""
    tp = float(np.sum(pred & truth))
    p = tp / max(float(np.sum(pred)), 1.0)
    r = tp / max(float(np.sum(truth)), 1.0)
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f1


def module_outputs(ms: ModuleSet, x_u8: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n, N], positive bool [n, N]) of every module on uint8 images.

    A module with a head says "my class" when its sigmoid score > 0.5; a module without a
    head (scored by its class logit) when its masked model's argmax is its class; a concern
    module (positive-class probability) when its concerned logit beats the unconcerned one.
    """
    if isinstance(ms, ConcernModuleSet):
        l2 = concern_logits(ms, x_u8, batch_size)
        return np.asarray(positive_probability(l2, ms.base.num_classes)), l2[..., 0] > l2[..., 1]
    mean, std = ms.normalization
    feats = features_for_dataset(ms.base, effective_masks(ms.masks), x_u8, mean, std, batch_size)
    classes = np.arange(ms.num_modules)
    scores = np.asarray(scores_from_logits(ms.heads, classes, feats))
    if ms.heads is not None:
        return scores, scores > 0.5
    return scores, feats.argmax(-1) == classes[None, :]


def module_scores_for(ms: ModuleSet, x_u8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores [n, N] of every module on uint8 images (head sigmoids, or class logits)."""
    return module_outputs(ms, x_u8, batch_size)[0]


def module_f1(ms: ModuleSet, x_u8: np.ndarray, y: np.ndarray) -> np.ndarray:
    """F1 [N] of each module's binary decision (class c vs rest) on labelled images; labels
    are the module set's class indices (-1 or any other value: a negative image)."""
    _, pos = module_outputs(ms, x_u8)
    return np.asarray([binary_metrics(pos[:, c], y == c)[2] for c in range(ms.num_modules)])


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


def retention(ms: ModuleSet) -> dict:
    """Kernel retention: per module (tied layers counted per layer), per layer x module."""
    eff = effective_masks(ms.masks)
    total = total_kernels(ms.base)
    per_module = sum(eff[p.name].sum(-1) * len(p.layers) for p in mask_points(ms.base)) / total
    per_layer = {
        s.name: (eff[s.mask].sum(-1) / s.out_channels).tolist() for s in ms.base.topology
    }
    return {"per_module": per_module.tolist(), "per_layer": per_layer, "mean": float(per_module.mean())}


def jaccard_matrix(ms: ModuleSet) -> np.ndarray:
    """[N, N] Jaccard index between modules' kept-kernel sets (tied layers per layer)."""
    flat = np.asarray(flatten_masks(ms.base, effective_masks(ms.masks), tied=True)) > 0
    inter = flat.astype(np.float64) @ flat.T.astype(np.float64)
    sizes = flat.sum(-1)
    union = sizes[:, None] + sizes[None, :] - inter
    return inter / np.maximum(union, 1)


def _module_fields(prf, jac: np.ndarray) -> dict:
    """Per-module precision / recall / F1 and the Jaccard matrix with its off-diagonal mean."""
    off = jac[~np.eye(len(jac), dtype=bool)]
    return {
        "module_precision": [p for p, _, _ in prf],
        "module_recall": [r for _, r, _ in prf],
        "module_f1": [f for _, _, f in prf],
        "mean_module_f1": float(np.mean([f for _, _, f in prf])),
        "jaccard": jac.tolist(),
        "mean_jaccard": float(off.mean()) if off.size else 1.0,
    }


def evaluate_module_set(
    ms: ModuleSet,
    eval_split: tuple[np.ndarray, np.ndarray],
    test_split: tuple[np.ndarray, np.ndarray],
    info,
    *,
    flops: bool = True,
) -> dict:
    """All metrics of issue #3 as a JSON-ready dict.

    eval_split: images/labels for module precision/recall/F1 (the reference: first 20% of the
    test set); test_split: images/labels for composed vs base accuracy (last 80%).
    """
    n = ms.num_modules
    xe, ye = eval_split
    xt, yt = test_split
    _, pos = module_outputs(ms, xe)
    prf = [binary_metrics(pos[:, c], ye == c) for c in range(n)]
    st = module_scores_for(ms, xt)
    composed = float((st.argmax(-1) == yt).mean())
    base = float((predict(ms.base, xt, info).argmax(-1) == yt).mean())
    ret = retention(ms)
    jac = jaccard_matrix(ms)
    out = {
        "base_accuracy": base,
        "composed_accuracy": composed,
        "accuracy_loss": base - composed,
        "mean_kernel_retention": ret["mean"],
        "kernel_retention": ret["per_module"],
        "layer_retention": ret["per_layer"],
        **_module_fields(prf, jac),
        "eval_images": int(len(ye)),
        "test_images": int(len(yt)),
    }
    if flops:
        base_f = forward_flops(ms.base)
        mods = extract_all(ms.base, ms.masks, ms.heads)
        mf = [forward_flops(m.model) for m in mods]
        out.update(base_flops=base_f, module_flops=mf, module_flops_ratio=[f / base_f for f in mf])
    return out


# ------------------------------------------------------------------ concern identification
def concern_logits(ms: ConcernModuleSet, x_u8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Binary logits [n, N, 2] (concerned, unconcerned) of every module on uint8 images."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .data import normalize
    from .gradsplitter import resolve_chunk, GradSplitterConfig

    mean, std = ms.normalization
    n = ms.num_modules
    chunk = resolve_chunk(GradSplitterConfig(), n)
    graphdef, state = nnx.split(ms.base)
    keep = {k: jnp.asarray(v) for k, v in ms.keep().items()}
    hw, hb = jnp.asarray(ms.head_w), jnp.asarray(ms.head_b)

    @jax.jit
    def run(state, keep, hw, hb, x):
        return module_logits(nnx.merge(graphdef, state), keep, hw, hb, x, chunk)

    out = []
    for i in range(0, len(x_u8), batch_size):
        xb = x_u8[i:i + batch_size]
        m = len(xb)
        if m < batch_size and len(x_u8) > batch_size:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - m, 0)])
        out.append(np.asarray(run(state, keep, hw, hb, jnp.asarray(normalize(xb, mean, std))))[:m])
    return np.concatenate(out) if out else np.zeros((0, n, 2), np.float32)


def _position_jaccard(ms: ConcernModuleSet) -> tuple[np.ndarray, np.ndarray]:
    """([N, N] Jaccard index between modules' active-position sets, [N] module vs model)."""
    n = ms.num_modules
    act = np.concatenate([~np.asarray(v).reshape(n, -1) for v in ms.inactive.values()], 1)
    a = act.astype(np.float64)
    inter = a @ a.T
    sizes = a.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return inter / np.maximum(union, 1), sizes / act.shape[1]


def evaluate_concern_set(ms: ConcernModuleSet, eval_split, test_split, info) -> dict:
    """Pan & Rajan's metrics as a JSON-ready dict.

    Decomposition cost = model accuracy - composed accuracy (top-1 and top-5, voting rule) on
    ``test_split``; module precision / recall / F1 of the binary decisions on ``eval_split``;
    agreement of composed and model predictions; Jaccard index of active-position sets
    (between modules; module vs model = the module's active fraction, since the model keeps
    every position); module size (parameters: the model's, no weight is removed).
    """
    n = ms.num_modules
    xe, ye = eval_split
    xt, yt = test_split
    _, pos_e = module_outputs(ms, xe)
    prf = [binary_metrics(pos_e[:, c], ye == c) for c in range(n)]
    prob, pos = module_outputs(ms, xt)
    scores = np.asarray(vote_scores(prob, pos))
    composed = vote(prob, pos)
    logits = predict(ms.base, xt, info)
    base_pred = logits.argmax(-1)
    jac, vs_model = _position_jaccard(ms)
    out = {
        "base_accuracy": float((base_pred == yt).mean()),
        "composed_accuracy": float((composed == yt).mean()),
        "base_top5": topk_accuracy(logits, yt, 5),
        "composed_top5": topk_accuracy(scores, yt, 5),
        "agreement_with_model": float((composed == base_pred).mean()),
        "single_positive_fraction": float((pos.sum(-1) == 1).mean()),
        **_module_fields(prf, jac),
        "jaccard_vs_model": vs_model.tolist(),
        "mean_jaccard_vs_model": float(vs_model.mean()),
        "module_size": module_size(ms.base, ms.inactive),
        "eval_images": int(len(ye)),
        "test_images": int(len(yt)),
    }
    out["accuracy_loss"] = out["base_accuracy"] - out["composed_accuracy"]
    out["top5_loss"] = out["base_top5"] - out["composed_top5"]
    return out
