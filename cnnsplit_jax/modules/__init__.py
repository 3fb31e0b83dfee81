"""Modules: saved module sets (``module_set``), how a module scores (``heads``), physical
extraction (``extract``) and THE forward pass of modules of every kind (``forward``)."""

from .extract import ExtractedModule, extract_all, extract_module, forward_flops, kept_indices
from .forward import (FORWARD_FORMS, ConcernGroup, ExtractedGroup, ForwardForm, MaskedGroup, Pick, default_chunk,
                      extracted_scores, group_outputs, masked_logits, module_outputs, node_logits)
from .heads import (Heads, concern_positive, head_scores, init_heads, positive_probability, scores_from_logits,
                    vote_scores)
from .module_set import ConcernModuleSet, ModuleSet, load_module_set, save_module_set

__all__ = [
    "FORWARD_FORMS", "ConcernGroup", "ConcernModuleSet", "ExtractedGroup", "ExtractedModule", "Heads", "ForwardForm",
    "MaskedGroup", "ModuleSet", "Pick", "default_chunk", "extract_all",
    "extract_module", "extracted_scores", "forward_flops", "group_outputs", "head_scores", "init_heads",
    "kept_indices", "load_module_set", "masked_logits", "module_outputs", "node_logits",
    "positive_probability", "concern_positive", "save_module_set", "scores_from_logits", "vote_scores",
]
