"""CNNSplitter (Qi et al., ASE 2022): per-class kernel masks searched by a genetic algorithm.

Files (spec cnnsplitter.md): ``importance`` (1a.3, kernel importance), ``sensitivity`` (1a.4,
layer sensitivity and an automatic rule), ``genome`` (grouped genome, heuristic initial
population), ``ga`` (the reference's operators on evosax's init/ask/tell, one GA per class
advanced together with vmap), ``fitness`` (the joint fitness: the reference's recorder),
``logits`` (the fitness forward), ``config``, ``search`` (``prepare`` / ``problem`` /
``init`` / ``step(key, state, pb)`` per generation, and ``split``: the whole checkpointed search)
and ``generation`` (one generation as a pure function: ``jax.jit`` / ``lax.scan``).
"""

from .config import (ALGORITHMS, PRESET_MODELS, PRESETS, CNNSplitterConfig, configure, preset_caveat, preset_for,
                     resolve_preset)
from .fitness import FitnessConfig, FitnessResult, jaccard_distance_table, joint_fitness, reference_thresholds
from .genome import GenomeLayout, decode, genome_layout, heuristic_population
from .importance import Importance, importance_order, kernel_importance
from .generation import as_arrays, generation_step
from .logits import LogitCache, LogitStore, cached_module_logits, module_logits
from .search import (CNNSplitterState, Prepared, Problem, importance_images, init, prepare, problem, report, split,
                     step, summary_line)
from .sensitivity import RATIOS, layer_sensitivity, sensitive_layers

__all__ = [
    "ALGORITHMS", "PRESETS", "PRESET_MODELS", "preset_caveat", "preset_for", "CNNSplitterConfig", "CNNSplitterGA", "CNNSplitterState", "FitnessConfig", "FitnessResult",
    "GenomeLayout", "Importance", "LogitCache", "LogitStore", "as_arrays", "generation_step", "Prepared", "Problem", "RATIOS", "cached_module_logits",
    "decode", "genome_layout", "heuristic_population", "importance_images", "importance_order", "init", "jaccard_distance_table",
    "joint_fitness", "kernel_importance", "layer_sensitivity", "module_logits", "mutation_genes", "prepare",
    "problem", "reference_thresholds", "report", "sensitive_layers", "split", "step", "summary_line", "configure",
    "resolve_preset",
]


def __getattr__(name):
    # the GA subclasses evosax's, and importing evosax runs JAX (initialising the backend), so
    # it loads on first use: ``import cnnsplit_jax`` then ``distributed.initialize()`` must work
    if name in ("CNNSplitterGA", "mutation_genes"):
        from . import ga

        return getattr(ga, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
