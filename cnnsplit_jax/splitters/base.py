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
from flax import nnx

from .. import checkpoint, data

__all__ = ["SplitData", "SplitResult", "SearchDivergedError", "check_labels", "check_data", "resume_identity"]


class SearchDivergedError(FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is left intact."""


class SplitData(NamedTuple):
    """The data a splitter reads: uint8 images ``[n, 32, 32, C]`` with int labels ``[n]``.

    x_train / y_train: the base model's training split (GradSplitter trains on it, concern
    identification reads it); x_val / y_val: its validation split (GradSplitter validates on
    it, CNNSplitter searches on it); mean / std: the base model's input normalisation.
    x_all / y_all: optional, the dataset's whole training set in file order (CNNSplitter's
    ``importance_data="reference"`` draws its per-class importance images from it).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    mean: Sequence[float]
    std: Sequence[float]
    x_all: np.ndarray | None = None
    y_all: np.ndarray | None = None

    @property
    def normalization(self) -> data.Normalization:
        """``mean`` and ``std`` as one ``data.Normalization``."""
        return data.Normalization.of((self.mean, self.std))


@dataclasses.dataclass
class SplitResult:
    """The outcome of any splitter's ``split``."""

    module_set: object
    history: list
    seconds: float
    details: dict = dataclasses.field(default_factory=dict)


def check_labels(num_classes: int, *labels: np.ndarray) -> None:
    """Raise ValueError unless every label is an integer in ``[0, num_classes)``."""
    for y in labels:
        y = np.asarray(y)
        data.check_labels(y)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")


def check_data(d: SplitData, num_classes: int) -> None:
    """Raise ValueError unless ``d`` holds uint8 images with as many integer labels in
    ``[0, num_classes)`` and one finite positive normalisation value per channel."""
    for part in ("train", "val"):
        x, y = getattr(d, f"x_{part}"), getattr(d, f"y_{part}")
        data.check_images(x, f"x_{part}")
        if len(x) != len(y):
            raise ValueError(f"x_{part} has {len(x)} images but y_{part} {len(y)} labels")
        check_labels(num_classes, y)
    d.normalization.check(d.x_val.shape[-1])


def resume_identity(model, d: SplitData, extra: dict | None = None, *, train: bool = True) -> dict:
    """What a resumed search must find equal to the run it continues: the caller's ``extra``
    keys first (the pipeline's base run, dataset, subset), then the model's structure and
    a digest of its weights, digests of the data it reads (the training split when
    ``train``) and the normalisation."""
    ident = {**(extra or {}), "model": checkpoint.config_json(model.config()),
             "model weights digest": checkpoint.fingerprint(nnx.state(model))}
    if train:
        ident["training data digest"] = checkpoint.fingerprint(d.x_train, d.y_train)
    ident["validation data digest"] = checkpoint.fingerprint(d.x_val, d.y_val)
    ident["normalization"] = [list(v) for v in d.normalization]
    return ident
