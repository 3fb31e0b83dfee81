"""The Jaccard index of Pan & Rajan: a concern module's weights and biases against the model's.

A concern module keeps every weight (it deactivates positions, ``ConcernModuleSet``), so its
*effective* parameters are what the comparison sees (``effective_params``):

* a conv whose output channel is deactivated at every position of the node it produces
  (``Node.convs``) computes nothing for the module: that channel's kernel and bias are zero;
* the output layer keeps the model's K columns as the lab's code does: the concerned column
  as trained, the channeled unconcerned column (``head_w[:, 1]``) in the first other class's
  column, the other columns zero; rows of features removed by MC-BLN are zero.

Three readings of "the Jaccard index of the flattened weights" (spec field-survey.md §1.9),
``by``:

* ``"lab"``: the lab's function (its RNN code, the same group): the kernels only (no biases)
  flattened into lists A and B, the intersection of their value sets, and the union taken over
  the *list lengths*, ``|set(A) n set(B)| / (len(A) + len(B) - |set(A) n set(B)|)``. With a
  fraction f of the weights zeroed it is about ``(1 - f) / (1 + f)``;
* ``"values"`` (ours): kernels and biases, sets of distinct values on both sides,
  ``|A n B| / (|A| + |B| - |A n B|)`` with set sizes; about ``1 - f``;
* ``"positions"``: non-zero entries at the same flat position with the same value, over the
  entries non-zero in either.

1 means the module is the model; the paper reads a lower index as a smaller module.
"""

from __future__ import annotations

import numpy as np

__all__ = ["effective_params", "weight_jaccard", "JACCARD_READINGS"]

JACCARD_READINGS = ("lab", "values", "positions")


def _model_params(base) -> dict[str, np.ndarray]:
    out = {}
    for nd in base.nodes("sum") + base.nodes("conv"):
        for conv in nd.convs:
            layer = getattr(base, conv)
            out[f"{conv}.kernel"] = np.asarray(layer.kernel[...])
            out[f"{conv}.bias"] = np.asarray(layer.bias[...])
    out["fc.kernel"] = np.asarray(base.fc.kernel[...])
    out["fc.bias"] = np.asarray(base.fc.bias[...])
    return out


def effective_params(ms, i: int, model: dict | None = None) -> dict[str, np.ndarray]:
    """``{"<layer>.kernel" / "<layer>.bias": array}`` of module ``i`` of a ``ConcernModuleSet``
    (see the module docstring); ``model``: the base's parameters in that layout (computed when
    None)."""
    model = _model_params(ms.base) if model is None else model
    out = dict(model)
    for nd in ms.base.nodes(ms.residual):
        dead = np.asarray(ms.inactive[nd.name][i]).reshape(-1, nd.shape[-1]).all(0)  # [C]
        for conv in nd.convs:
            out[f"{conv}.kernel"] = np.where(dead, 0.0, out[f"{conv}.kernel"]).astype(np.float32)
            out[f"{conv}.bias"] = np.where(dead, 0.0, out[f"{conv}.bias"]).astype(np.float32)
    k = model["fc.bias"].shape[0]
    c, other = i, (0 if i != 0 else 1)  # module i is class i's
    keep = ~np.asarray(ms.removed[i], bool)[:, None]
    w = np.zeros_like(model["fc.kernel"])
    b = np.zeros(k, np.float32)
    w[:, c], w[:, other] = ms.head_w[i, :, 0], ms.head_w[i, :, 1]
    b[c], b[other] = ms.head_b[i, 0], ms.head_b[i, 1]
    out["fc.kernel"], out["fc.bias"] = np.where(keep, w, 0.0).astype(np.float32), b
    return out


def _jaccard(a: np.ndarray, b: np.ndarray, by: str) -> float:
    if by == "lab":
        inter = np.intersect1d(a, b).size
        union = a.size + b.size - inter
    elif by == "values":
        ua, ub = np.unique(a), np.unique(b)
        inter = np.intersect1d(ua, ub, assume_unique=True).size
        union = ua.size + ub.size - inter
    else:
        nz = (a != 0) | (b != 0)
        inter = int(((a == b) & (a != 0)).sum())
        union = int(nz.sum())
    return float(inter / union) if union else 1.0


def weight_jaccard(ms, by: str = "values") -> np.ndarray:
    """float [N]: each module's Jaccard index with the model over its flattened parameters
    (``by``: ``"lab"``, ``"values"`` or ``"positions"``, see the module docstring)."""
    if by not in JACCARD_READINGS:
        raise ValueError(f"by must be one of {JACCARD_READINGS}, got {by!r}")
    model = _model_params(ms.base)
    names = sorted(n for n in model if by != "lab" or n.endswith(".kernel"))
    flat = np.concatenate([model[n].ravel() for n in names])
    return np.asarray([_jaccard(np.concatenate([p[n].ravel() for n in names]), flat, by)
                       for p in (effective_params(ms, i, model) for i in range(ms.num_modules))])
