"""Concern identification's settings (``ConcernConfig``)."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from ...models.resnet import DEFAULT_RESIDUAL, RESIDUAL_MAPPINGS
from ...validate import at_least, finite

__all__ = ["ConcernConfig", "BACKTRACK", "BLN_RULES", "RESIDUAL_MAPPINGS"]

BACKTRACK = get_args(Literal["none", "bln", "bi"])
BLN_RULES = ("absolute", "negative", "relative")


@dataclasses.dataclass(frozen=True)
class ConcernConfig:
    """Hyper-parameters of the decomposition.

    concerned_per_class: class-c training inputs used for CI (the lab's 1000; ``None``: all).
    min_confidence: only inputs the model predicts as their class with a softmax probability
      above this are concerned inputs (the lab's 0.9; ``None``: no filter). A class with no
      such input falls back to its unfiltered inputs, with a ``RunWarning``.
    negative_ratio: negatives per concerned input for TI (paper: 1.0).
    backtrack: ``"bln"`` (MC-BLN, the paper's choice), ``"bi"`` (MC-BLN then MC-BI, back to the
      input) or ``"none"`` (CI+TI+MC): the three columns of the paper's Table 1.
    residual: how a residual block's Add maps to nodes (``models.resnet``): ``"conv"``, the
      paper's (conv2's output and the shortcut branch are masked before the Add; this is what
      costs accuracy after CI+TI), or ``"sum"`` (the sum is masked at its ReLU: exact on the
      concerned inputs).
    delta: MC-BLN's threshold for a "strong" edge.
    bln_rule: how ``delta`` reads (``backtrack.backtrack_bln``): ``"absolute"`` (default: the
      paper's absolute threshold with the prose's sign, "nodes connected only to the
      unconcerned node": a strong edge is ``w > delta``); ``"negative"`` (the same threshold
      with the opposite sign, ``w < -delta``); ``"relative"`` (``|w| >= delta x`` the column's
      largest ``|w|``, either sign: this library's earlier rule).
    batch_size: images per forward pass. seed: negative sampling.
    """

    concerned_per_class: int | None = 1000
    min_confidence: float | None = 0.9
    negative_ratio: float = 1.0
    backtrack: Literal["none", "bln", "bi"] = "bln"
    residual: Literal["conv", "sum"] = DEFAULT_RESIDUAL
    delta: float = 0.5
    bln_rule: Literal["absolute", "negative", "relative"] = "absolute"
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.backtrack not in BACKTRACK:
            raise ValueError(f"backtrack must be one of {BACKTRACK}, got {self.backtrack!r}")
        finite("negative_ratio", self.negative_ratio, lo=0.0)
        at_least("batch_size", self.batch_size, 1)
        at_least("seed", self.seed, 0)
        if self.residual not in RESIDUAL_MAPPINGS:
            raise ValueError(f"residual must be one of {RESIDUAL_MAPPINGS}, got {self.residual!r}")
        if self.bln_rule not in BLN_RULES:
            raise ValueError(f"bln_rule must be one of {BLN_RULES}, got {self.bln_rule!r}")
        finite("delta", self.delta, lo=0.0, hi=1.0)
        if self.concerned_per_class is not None and self.concerned_per_class < 1:
            raise ValueError(f"concerned_per_class must be >= 1, got {self.concerned_per_class}")
        if self.min_confidence is not None and not 0 <= self.min_confidence < 1:
            raise ValueError(f"min_confidence must lie in [0, 1), got {self.min_confidence}")
