"""Concern identification's settings (``ConcernConfig``)."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from ...models.resnet import DEFAULT_RESIDUAL, RESIDUAL_MAPPINGS
from ...validate import at_least, finite

__all__ = ["ConcernConfig", "BACKTRACK", "BLN_RULES", "RESIDUAL_MAPPINGS"]

BACKTRACK = get_args(Literal["none", "bln", "bi", "bi_preserving"])
BLN_RULES = ("listing", "absolute", "negative", "relative")


@dataclasses.dataclass(frozen=True)
class ConcernConfig:
    """Hyper-parameters of the decomposition.

    concerned_per_class: class-c training inputs used for CI (the lab's 1000; ``None``: all).
    min_confidence: only inputs the model predicts as their class with a softmax probability
      above this are concerned inputs (the lab's 0.9; ``None``: no filter). A class with no
      such input falls back to its unfiltered inputs, with a ``RunWarning``, and is listed in
      ``split.json`` (``decomposition.unconfident_classes``); the lab has no such fallback.
    unconfident: ``"fallback"`` (the above) or ``"refuse"`` (a ``ValueError`` naming the
      classes instead).
    negative_ratio: negatives per concerned input for TI (paper: 1.0).
    backtrack: ``"bln"`` (MC-BLN, the paper's choice), ``"bi"`` (MC-BLN then MC-BI as the paper's
      Algorithm 3: per conv, its own outputs only; changes what a module computes),
      ``"bi_preserving"`` (MC-BLN then an MC-BI that consults every consumer, identity
      shortcuts included, and never changes a module's output) or ``"none"`` (CI+TI+MC).
      none / bln / bi are the three columns of the paper's Table 1.
    residual: how a residual block's Add maps to nodes (``models.resnet``): ``"conv"``, the
      paper's (maps for conv outputs only: conv2's output and a projection shortcut's are
      masked before the Add, an identity shortcut is not; what costs accuracy after CI+TI),
      ``"conv_identity"`` (the identity input masked before the Add too; this library's
      ``"conv"`` before 2026-12-04) or ``"sum"`` (the sum is masked at its ReLU: exact on the
      concerned inputs).
    delta: MC-BLN's threshold for a "strong" edge.
    bln_rule: MC-BLN's removal rule (``backtrack.backtrack_bln``): ``"listing"`` (default: the
      paper's Algorithm 2 as printed, removed when ``W[i, V_uc] <= -delta`` and
      ``W[i, V_c] >= delta``); readings of the prose, "nodes connected only to the unconcerned
      node" (a strong V_uc edge and a V_c edge that is not strong): ``"absolute"`` (strong:
      ``w > delta``; the default before 2026-12-03), ``"negative"`` (``w < -delta``),
      ``"relative"`` (``|w| >= delta x`` the column's largest ``|w|``, either sign).
    batch_size: images per forward pass. seed: negative sampling.
    """

    concerned_per_class: int | None = 1000
    min_confidence: float | None = 0.9
    negative_ratio: float = 1.0
    backtrack: Literal["none", "bln", "bi", "bi_preserving"] = "bln"
    residual: Literal["conv", "conv_identity", "sum"] = DEFAULT_RESIDUAL
    delta: float = 0.5
    bln_rule: Literal["listing", "absolute", "negative", "relative"] = "listing"
    unconfident: Literal["fallback", "refuse"] = "fallback"
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
        if self.unconfident not in ("fallback", "refuse"):
            raise ValueError(f"unconfident must be 'fallback' or 'refuse', got {self.unconfident!r}")
        if self.concerned_per_class is not None and self.concerned_per_class < 1:
            raise ValueError(f"concerned_per_class must be >= 1, got {self.concerned_per_class}")
        if self.min_confidence is not None and not 0 <= self.min_confidence < 1:
            raise ValueError(f"min_confidence must lie in [0, 1), got {self.min_confidence}")
