"""What every splitter shares: its input (``SplitData``), its output (``SplitResult``) and its
failure on a diverged search (``SearchDivergedError``).

Every method has the same entry point::

    result = split(key, model, data, cfg, *, ckpt_dir=None, resume=False, callbacks=None)
    result.module_set      # ModuleSet / ConcernModuleSet, selection already applied
    result.history         # one JSON-ready record per epoch / generation / pass
    result.seconds         # wall time of the search
    result.details         # method-specific extras (final state, importance, ...)

and, where the method is iterative, optax/evosax-style pieces: ``init(key, model, cfg, ...)
-> state`` and steps ``(state, ...) -> (state, metrics)``. Progress is reported through
``cnnsplit_jax.progress`` callbacks.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["SplitData", "SplitResult", "SearchDivergedError", "check_labels"]


class SearchDivergedError(FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is left intact."""


class SplitData(NamedTuple):
    """The data a splitter reads: uint8 images ``[n, 32, 32, C]`` with int labels ``[n]``.

    x_train / y_train: the base model's training split (GradSplitter trains on it, concern
    identification reads it); x_val / y_val: its validation split (GradSplitter validates on
    it, CNNSplitter searches on it); mean / std: the base model's input normalisation.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    mean: Sequence[float]
    std: Sequence[float]


@dataclasses.dataclass
class SplitResult:
    """The outcome of any splitter's ``split``."""

    module_set: object
    history: list
    seconds: float
    details: dict = dataclasses.field(default_factory=dict)


def check_labels(num_classes: int, *labels: np.ndarray) -> None:
    """Raise ValueError unless every label lies in ``[0, num_classes)``."""
    for y in labels:
        y = np.asarray(y)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
