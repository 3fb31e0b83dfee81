"""MwT's modularization after modular training (spec mwt.md, "Modularization").

Every training sample's binary masks (generator output > 0) at every masked layer give, for
class c and layer l, the frequency of each kernel among class-c samples. Module c keeps kernel
k of layer l when its frequency is >= the threshold (0.9); a layer that would keep nothing has
its threshold lowered in steps of 0.05 until it keeps a kernel (an error when it reaches 0: the
layer's kernels are (nearly) never active for the class: the last threshold tried is
0.9 - 17 x 0.05 = 0.05). The module mask is the concatenation of the layer masks.

Metrics, as the reference computes them:

* kernel retention: the fraction of kernels a module keeps (mean over modules);
* cohesion: per class, the mean pairwise Jaccard index of its samples' binary masks restricted
  to the module's kernels, averaged over classes;
* coupling: the mean pairwise Jaccard index of the module masks.

The reference measures the cohesion of modules formed after training (CNNSplitter's) over
every pair i < j instead (``pairwise_jaccard``; ``split.activation_cohesion``).

"Pairwise" is the reference's rolling scheme (``rolling_jaccard``): for shifts 1..n-1, the
Jaccard index of each row with the row ``shift`` places further (cyclically), averaged over
rows, then over shifts. Two empty masks have no Jaccard index (0/0): such a pair is left out
of its shift's mean (the reference's mean becomes NaN); a value is NaN only when no pair has one.

Masks here are NumPy arrays: ``binary``: a list over layers of bool [n, C_l]; module masks bool
[N, K] with K = sum of C_l, layers in the list's order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["class_frequencies", "layer_threshold", "module_masks", "rolling_jaccard", "pairwise_jaccard",
           "module_cohesion", "module_coupling", "kernel_retention"]


def _check_binary(binary: Sequence[np.ndarray], labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if not len(binary):
        raise ValueError("no masked layer: binary masks need at least one layer")
    for m in binary:
        if np.ndim(m) != 2 or len(m) != len(labels):
            raise ValueError(f"every layer's masks must be [n={len(labels)}, C], got {np.shape(m)}")
    return labels


def class_frequencies(binary: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per layer, float32 [num_classes, C_l]: the fraction of each class's samples whose kernel
    is active (float32, as the reference's ``sum / count``). A class without samples is an error."""
    labels = _check_binary(binary, labels)
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    if (counts == 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no samples: their modules "
                         "cannot be formed")
    out = []
    for m in binary:
        active = np.stack([np.asarray(m, bool)[labels == c].sum(0) for c in range(num_classes)])
        out.append((active.astype(np.float32) / counts[:, None].astype(np.float32)).astype(np.float32))
    return out


def layer_threshold(freq: np.ndarray, threshold: float = 0.9, step: float = 0.05) -> float:
    """The threshold a layer uses: ``threshold`` if some kernel's frequency reaches it, else
    lowered by ``step`` (repeated float subtraction, compared in float32, as the reference)
    until one does. ValueError when it falls to 0 or below first."""
    if not 0 < threshold <= 1 or not step > 0:
        raise ValueError(f"threshold must lie in (0, 1] and step be > 0, got {threshold}, {step}")
    freq = np.asarray(freq, np.float32)
    cur = float(threshold)
    while not (freq >= np.float32(cur)).any():
        cur -= step
        if cur <= 0:
            raise ValueError(f"no kernel of this layer reaches the lowest threshold for the class (largest "
                             f"frequency {float(freq.max()) if freq.size else 'n/a'}): the threshold fell to "
                             f"{cur:.3g}")
    return cur


def module_masks(freqs: Sequence[np.ndarray], threshold: float = 0.9, step: float = 0.05):
    """Module masks from ``class_frequencies``: (bool [N, K], thresholds float [N, L] used)."""
    n = freqs[0].shape[0]
    masks, used = [], np.zeros((n, len(freqs)))
    for c in range(n):
        parts = []
        for li, f in enumerate(freqs):
            used[c, li] = layer_threshold(f[c], threshold, step)
            parts.append(f[c] >= np.float32(used[c, li]))
        masks.append(np.concatenate(parts))
    return np.stack(masks), used


def rolling_jaccard(masks: np.ndarray) -> float:
    """The reference's pairwise Jaccard index of the rows of ``masks`` [n, K] (see the module
    docstring); NaN for fewer than 2 rows or when every pair is two empty rows."""
    m = np.asarray(masks, bool)
    n = len(m)
    per_shift = []
    for s in range(1, n):
        other = np.roll(m, -s, axis=0)
        inter = (m & other).sum(1)
        union = (m | other).sum(1)
        ok = union > 0
        if ok.any():
            per_shift.append(float((inter[ok] / union[ok]).mean()))
    return float(np.mean(per_shift)) if per_shift else float("nan")


def pairwise_jaccard(masks: np.ndarray) -> float:
    """The mean Jaccard index over every pair i < j of the rows of ``masks`` [n, K], as the
    reference's ``calculate_cohesion`` (intersections by a matrix product, the upper
    triangle); a pair of two empty rows has none and is left out (the reference's mean becomes
    NaN); NaN for fewer than 2 rows or when no pair has one."""
    m = np.asarray(masks, bool).astype(np.float64)
    inter = m @ m.T
    count = m.sum(1)
    union = count[:, None] + count[None, :] - inter
    i, j = np.triu_indices(len(m), 1)
    ok = union[i, j] > 0
    return float((inter[i, j][ok] / union[i, j][ok]).mean()) if ok.any() else float("nan")


def module_cohesion(binary: Sequence[np.ndarray], labels: np.ndarray, masks: np.ndarray) -> tuple[float, list]:
    """(mean over classes, per class) of ``rolling_jaccard`` over each class's samples' masks
    (layers concatenated) restricted to its module's kernels ``masks`` [N, K]."""
    labels = _check_binary(binary, labels)
    flat = np.concatenate([np.asarray(m, bool) for m in binary], axis=1)
    if flat.shape[1] != masks.shape[1]:
        raise ValueError(f"samples have {flat.shape[1]} kernels, module masks {masks.shape[1]}")
    per = [rolling_jaccard(flat[labels == c] & np.asarray(masks[c], bool)[None]) for c in range(len(masks))]
    return float(np.mean(per)), per


def module_coupling(masks: np.ndarray) -> float:
    """``rolling_jaccard`` of the module masks [N, K]."""
    return rolling_jaccard(masks)


def kernel_retention(masks: np.ndarray) -> tuple[float, list]:
    """(mean, per module) fraction of the kernels each module keeps."""
    per = np.asarray(masks, bool).mean(1)
    return float(per.mean()), per.tolist()
