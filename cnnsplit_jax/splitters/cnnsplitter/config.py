"""CNNSplitter's hyper-parameters (defaults: the reference's simcnn_cifar10 configuration)."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from ...validate import at_least, finite

__all__ = ["CNNSplitterConfig", "ALGORITHMS", "PRESETS", "PRESET_MODELS", "configure", "preset_caveat", "preset_for",
           "resolve_preset"]

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
    min_keep / max_keep: compositions kept per level of the joint fitness. thresholds:
    ``((composition size, minimum accuracy), ...)`` of that pruning (None: the reference's for
    the class count, ``fitness.reference_thresholds``). module_group: modules per vmapped group
    of the fitness forward (``lax.map`` over groups). shared_initial_population: every class's
    GA starts from the same genome bits (the reference seeds its initializer once; the genes
    are importance ranks, so the decoded masks still differ per class); False: one draw per
    class.
    algorithm: ``"cnnsplitter"`` (the paper's operators, ``ga.CNNSplitterGA``) or
    ``"simple_ga"``: evosax's stock SimpleGA on a continuous genome thresholded at 0 (std
    0.5, crossover rate 0.5; no elitism) -- a fast alternative, not the paper's algorithm.
    importance_data: the images of kernel importance: ``"search"`` (the search split, every
    class's images in it) or ``"reference"`` (per class, the held-out 20% of that class's
    training images after a seed-1009 shuffle, as the reference's per-class loader; needs
    ``SplitData.x_all``). Pair it with a base model trained with ``split_scheme="cnnsplitter"``
    for the reference's search split too.
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
    thresholds: tuple[tuple[int, float], ...] | None = None
    module_group: int = 10
    # the genome and the initial population
    groups: int | None = None
    sensitive: tuple[str, ...] | None = None
    sensitive_ratios: tuple[float, ...] = (0.6, 0.7, 0.8)
    other_ratios: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    shared_initial_population: bool = True
    # preprocessing: importance and sensitivity
    importance_threshold: float = 0.9
    sensitivity_drop: float = 0.05
    sensitivity_images: int | None = None
    importance_data: Literal["search", "reference"] = "search"
    seed: int = 0
    #: the preset these settings started from (recorded in ``split.json``; set by ``configure``)
    preset: str | None = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be 'cnnsplitter' or 'simple_ga', got {self.algorithm!r}")
        if self.importance_data not in ("search", "reference"):
            raise ValueError(f"importance_data must be 'search' or 'reference', got {self.importance_data!r}")
        if self.thresholds is not None and any(not 0 <= a <= 1 for _, a in self.thresholds):
            raise ValueError(f"thresholds must be accuracies in [0, 1], got {self.thresholds}")
        for name, lo in (("population", 1), ("generations", 0), ("min_keep", 1), ("max_keep", 1), ("module_group", 1),
                         ("num_parents", 1), ("keep_parents", 0), ("seed", 0)):
            at_least(name, getattr(self, name), lo)
        for name in ("early_stop", "eval_images", "sensitivity_images"):
            at_least(name, getattr(self, name), 0, optional=True)
        at_least("groups", self.groups, 1, optional=True)
        finite("mutation_percent", self.mutation_percent, lo=0.0, hi=100.0)
        for name in ("alpha", "gamma", "importance_threshold", "sensitivity_drop"):
            finite(name, getattr(self, name), lo=0.0, hi=1.0)
        for name in ("sensitive_ratios", "other_ratios"):
            if not getattr(self, name):
                raise ValueError(f"{name} must name at least one kept ratio")
            for r in getattr(self, name):
                finite(f"every one of {name}", r, lo=0.0, hi=1.0)
        if self.algorithm == "cnnsplitter" and not 0 < self.keep_parents <= self.num_parents <= self.population:
            raise ValueError(f"need 0 < keep_parents ({self.keep_parents}) <= num_parents ({self.num_parents}) <= "
                             f"population ({self.population})")


_REF_THRESHOLDS_10 = ((2, 0.95), (4, 0.95), (8, 0.85), (10, 0.80))
_SIM_SENSITIVE = tuple(f"conv_{i}" for i in range(7))

#: the reference's configurations per (model, dataset) (its ``configures/*.py``; sensitive layers
#: as mask points), and ``narrow``: the raised initial ratios and CPU budget that a narrow model
#: (width 0.125) needs, where the reference's ratios leave it at chance accuracy
PRESETS: dict[str, dict] = {
    "simcnn_cifar10": dict(population=100, generations=200, mutation_percent=5.0, gamma=0.9,
                           sensitive=_SIM_SENSITIVE, sensitive_ratios=(0.6, 0.7, 0.8),
                           other_ratios=(0.4, 0.5, 0.6, 0.7), thresholds=_REF_THRESHOLDS_10),
    "simcnn_svhn": dict(population=100, generations=200, mutation_percent=10.0, gamma=0.95,
                        sensitive=_SIM_SENSITIVE, sensitive_ratios=(0.4, 0.5, 0.6),
                        other_ratios=(0.1, 0.2, 0.3, 0.4), thresholds=_REF_THRESHOLDS_10),
    "simcnn_svhn_5": dict(population=50, generations=100, mutation_percent=10.0, gamma=0.95,
                          sensitive=_SIM_SENSITIVE[:5], sensitive_ratios=(0.4, 0.5, 0.6, 0.7),
                          other_ratios=(0.3, 0.4), thresholds=((2, 0.95), (4, 0.90), (5, 0.85))),
    "rescnn_cifar10": dict(population=100, generations=200, mutation_percent=5.0, gamma=0.9,
                           sensitive=("conv_0", "conv_1", "conv_4", "conv_5"), sensitive_ratios=(0.5, 0.6, 0.7),
                           other_ratios=(0.2, 0.3, 0.4), thresholds=_REF_THRESHOLDS_10),
    "rescnn_svhn": dict(population=100, generations=200, mutation_percent=10.0, gamma=0.9,
                        sensitive=("conv_1", "conv_4", "conv_5"), sensitive_ratios=(0.3, 0.4, 0.5),
                        other_ratios=(0.2, 0.3), thresholds=((2, 0.95), (4, 0.95), (8, 0.90), (10, 0.85))),
    "rescnn_svhn_5": dict(population=50, generations=100, mutation_percent=10.0, gamma=0.9,
                          sensitive=("conv_4", "conv_5"), sensitive_ratios=(0.3, 0.4, 0.5),
                          other_ratios=(0.2, 0.3), thresholds=((2, 0.95), (4, 0.90), (5, 0.85))),
    "narrow": dict(population=30, generations=30, num_parents=30, keep_parents=20, eval_images=500,
                   sensitivity_images=1000,
                   sensitive_ratios=(0.8, 0.9, 1.0), other_ratios=(0.6, 0.7, 0.8, 0.9)),
}


#: the model each preset family was tuned on: the reference's CNNSplitter models (plain conv, no BN)
PRESET_MODELS = {"simcnn": "simcnn_cnnsplitter", "rescnn": "rescnn_cnnsplitter"}
#: every zoo variant of those families -> its family
_FAMILY = {"simcnn": "simcnn", "simcnn_cnnsplitter": "simcnn", "rescnn": "rescnn", "rescnn_cnnsplitter": "rescnn"}


def preset_for(arch: str, dataset: str) -> str | None:
    """The reference's preset for model ``arch`` (any variant of SimCNN or ResCNN: the
    reference's own CNNSplitter models, or GradSplitter's BN variants) trained on ``dataset``
    (``svhn_cropped`` is SVHN), or None when it has none."""
    family = _FAMILY.get(arch)
    name = f"{family}_{dataset.replace('svhn_cropped', 'svhn')}"
    return name if family and name in PRESETS else None


def preset_caveat(arch: str, preset: str) -> str | None:
    """A warning when ``preset`` is applied to a model it was not tuned for (a BN variant, or
    another architecture), else None (and None for the CPU preset ``narrow``)."""
    tuned = PRESET_MODELS.get(preset.split("_")[0])
    if preset == "narrow" or arch == tuned:
        return None
    return (f"the reference tuned its {preset} configuration on {tuned or 'another model'} (plain conv, no "
            f"BatchNorm); on {arch} its initial ratios, sensitive layers and thresholds are a starting point, "
            "not the paper's setting")


def resolve_preset(arch: str, dataset: str, recipe: str | None = None) -> tuple[str | None, dict, list[str], list[str]]:
    """The preset a search of model ``arch`` on ``dataset`` starts from: ``recipe`` (None or
    ``"auto"``: ``preset_for(arch, dataset)``, none when the reference has none). Returns
    ``(name or None, its settings, warnings, notes)``: the warning is ``preset_caveat``'s, the
    note names a preset found automatically. Raises ValueError for an unknown ``recipe``."""
    name, notes = recipe or "auto", []
    if name == "auto":
        name = preset_for(arch, dataset)
        if name is None:
            return None, {}, [], []
        notes.append(f"CNNSplitter settings: the reference's {name} configuration")
    if name not in PRESETS:
        raise ValueError(f"--recipe {name} is not a CNNSplitter preset; expected auto or one of {sorted(PRESETS)}")
    caveat = preset_caveat(arch, name) if arch else None
    return name, PRESETS[name], [caveat] if caveat else [], notes


def configure(overrides: dict, recipe: str | None = None, *, arch: str = "", dataset: str = ""):
    """The config of a search of model ``arch`` on ``dataset``: the preset of
    ``resolve_preset`` with ``overrides`` (config fields) on top, parents capped at the
    population. Returns ``(config, warnings, notes)``."""
    name, preset, warnings, notes = resolve_preset(arch, dataset, recipe)
    default = CNNSplitterConfig()
    pop = overrides.get("population") or preset.get("population", default.population)
    cfg = CNNSplitterConfig(**{**preset, **overrides, "num_parents": min(default.num_parents, pop),
                               "keep_parents": min(default.keep_parents, pop), "preset": name})
    return cfg, warnings, notes
