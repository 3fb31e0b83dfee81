"""CNN decomposition by concern identification (Pan & Rajan, ICSE 2022), for ResNets:
``config`` (settings), ``inputs`` (concerned and negative inputs), ``backtrack`` (MC-BLN, MC-BI), ``decompose`` (CI, TI,
channeling, the split API, continuous learning's re-tangling, the energy estimate)."""

from .backtrack import apply_feature_removal, backtrack_input, window_reach
from .config import BACKTRACK, BLN_RULES, RESIDUAL_MAPPINGS, ConcernConfig
from .decompose import (Decomposition, activity_counts, backtrack_bln, channel, decompose, energy_estimate,
                        report, retangle, split, summary_line)
from .inputs import confidence_filter, membership, sample_sets, unconfident_classes

__all__ = ["ConcernConfig", "Decomposition", "sample_sets", "unconfident_classes", "confidence_filter", "membership", "activity_counts",
           "channel", "backtrack_bln", "decompose", "split", "report", "summary_line", "retangle", "energy_estimate", "BACKTRACK",
           "BLN_RULES", "RESIDUAL_MAPPINGS", "apply_feature_removal", "backtrack_input", "window_reach"]
