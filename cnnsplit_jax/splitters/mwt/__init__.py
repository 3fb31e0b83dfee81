"""MwT, modularizing while training (Qi et al., ICSE 2024): its building blocks.

* ``generators``: the per-layer mask generators (pooled layer input -> Linear -> ReLU ->
  Linear -> relu(tanh)), as pure functions over a parameter pytree;
* ``losses``: the cohesion and coupling losses over per-sample masks (cosine similarities of
  same- and different-label pairs) and the kernel rate;
* ``modularize``: per-class kernel frequencies, module masks by the frequency threshold
  (lowered per layer when a layer would keep nothing), kernel retention, and the Jaccard
  cohesion and coupling of the modules.

* ``training``: ``MwTObjective`` for ``train.fit`` (the model and its generators trained
  together), the generators' checkpoint next to the model;
* ``split``: the registry's entry point: a modularly trained model -> a ``ModuleSet``;
* ``reuse``: a sub-task module (union of the classes' masks, extracted, a new head,
  fine-tuned), as the reference's.
"""

from .generators import (generator_hidden, generator_mask, generator_layers, init_generator, init_generators,
                         sample_gates)
from .losses import mask_losses, modular_loss, mwt_loss
from .modularize import (class_frequencies, module_masks, layer_threshold, rolling_jaccard, pairwise_jaccard,
                         module_cohesion, module_coupling, kernel_retention)
from .split import MwTSplitConfig, activation_cohesion, record_masks, report, split, summary_line
from .training import MwTConfig, MwTObjective, load_generators, save_generators
from .reuse import (SUBTASK_RECIPE, MaskedSubtaskModule, SubtaskHead, fine_tune_subtask, load_subtask,
                    restricted_accuracy, save_subtask, subtask_logits, subtask_masks, subtask_module)

__all__ = ["generator_hidden", "init_generator", "generator_mask", "generator_layers",
           "init_generators", "sample_gates", "mask_losses", "mwt_loss", "modular_loss", "class_frequencies",
           "module_masks", "layer_threshold", "rolling_jaccard", "pairwise_jaccard", "activation_cohesion",
           "module_cohesion", "module_coupling",
           "kernel_retention", "MwTSplitConfig", "record_masks", "report", "split", "summary_line", "MwTConfig",
           "MwTObjective", "load_generators", "save_generators", "SUBTASK_RECIPE", "SubtaskHead",
           "MaskedSubtaskModule", "fine_tune_subtask", "restricted_accuracy", "subtask_masks", "subtask_module",
           "save_subtask", "load_subtask", "subtask_logits"]
