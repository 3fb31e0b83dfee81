"""CNNSplitter's hyper-parameters (defaults: the reference's simcnn_cifar10 configuration)."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

__all__ = ["CNNSplitterConfig", "ALGORITHMS"]

ALGORITHMS = get_args(Literal["cnnsplitter", "simple_ga"])


@dataclasses.dataclass(frozen=True)
class CNNSplitterConfig:
    """Defaults = the reference's simcnn_cifar10 config (population 100, 200 generations, 5%
    mutation, 50 parents, 20 kept, alpha 0.9, gamma 0.9, init ratios {.6,.7,.8} / {.4..7}).

    groups: genes per layer (None: 10 below 256 kernels, else 100). sensitive: mask points
    initialised with ``sensitive_ratios`` (None: the automatic rule of ``sensitive_layers``).
    sensitivity_drop: that rule's accuracy drop. importance_threshold: softmax confidence of
    the images that count for kernel importance. eval_images / sensitivity_images: images of
    the search split used for fitness / the sensitivity analysis (None or 0: all; CPU budgets).
    early_stop: generations without a better validation fitness before stopping (None or 0:
    off).
    min_keep / max_keep: compositions kept per level of the joint fitness. module_group:
    modules per vmapped group of the fitness forward (``lax.map`` over groups).
    algorithm: ``"cnnsplitter"`` (the paper's operators, ``ga.CNNSplitterGA``) or
    ``"simple_ga"``: evosax's stock SimpleGA on a continuous genome thresholded at 0 (std
    0.5, crossover rate 0.5; no elitism) -- a fast alternative, not the paper's algorithm.
    seed: the CLI's search key (``jax.random.key(seed)``).
    """

    # the GA
    population: int = 100
    generations: int = 200
    mutation_percent: float = 5.0
    num_parents: int = 50
    keep_parents: int = 20
    algorithm: Literal["cnnsplitter", "simple_ga"] = "cnnsplitter"
    early_stop: int | None = None
    # the joint fitness
    alpha: float = 0.9
    gamma: float = 0.9
    eval_images: int | None = None
    min_keep: int = 50
    max_keep: int = 500
    module_group: int = 10
    # the genome and the initial population
    groups: int | None = None
    sensitive: tuple[str, ...] | None = None
    sensitive_ratios: tuple[float, ...] = (0.6, 0.7, 0.8)
    other_ratios: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    # preprocessing: importance and sensitivity
    importance_threshold: float = 0.9
    sensitivity_drop: float = 0.05
    sensitivity_images: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be 'cnnsplitter' or 'simple_ga', got {self.algorithm!r}")
        if self.population < 1 or self.generations < 0:
            raise ValueError("population must be >= 1 and generations >= 0")
