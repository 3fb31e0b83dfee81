"""The registry of decomposition methods: one ``Method`` record per method, the only place that
knows a method by name. The pipeline, the CLI and the reports read the record; a new method is
a package with ``split`` / ``report`` / ``summary_line`` plus one entry in ``METHODS``."""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Callable, Mapping

from . import cnnsplitter, concern, gradsplitter, mwt
from .cnnsplitter import config as cnnsplitter_config
from .cnnsplitter import search as cnnsplitter_search
from .gradsplitter import config as gradsplitter_config
from .gradsplitter import search as gradsplitter_search
from .mwt import training as mwt_training

__all__ = ["Method", "Training", "METHODS", "method", "methods_for", "trained_for", "trainers"]


def _no_warnings(cfg, train_images: int) -> list[str]:
    del cfg, train_images
    return []


@dataclasses.dataclass(frozen=True)
class Training:
    """How a method that trains its own model (MwT) trains it and reads it back.

    key: the ``model.json`` key its trained runs record (a run with it is split by this method
    only). config / cli_fields: its training config (the loss's settings) and the fields
    ``cnnsplit train --method`` sets from flags. recipe: the default ``train.RECIPES`` entry.
    objective(config) -> a ``train.Objective``. save(run_dir, model, extra, config) -> the
    ``model.json`` entry (``key``) after writing what ``extra`` holds. load(run_dir, model,
    meta) -> keyword arguments of the method's ``split``. alone: what the model run without the
    objective's parameters is called in reports. entries: the top-level entries ``save`` writes
    in a run directory.
    """

    key: str
    config: type
    cli_fields: tuple[str, ...]
    recipe: str
    objective: Callable
    save: Callable
    load: Callable
    alone: str
    entries: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Method:
    """What the pipeline, the CLI and the reports need to know of one method.

    name: the CLI's ``--method`` value and ``split.json``'s ``method``. title: the paper's name.
    package: has ``split(key, model, data, cfg, *, ckpt_dir, resume, callbacks, mesh[,
    identity])``, ``report(result, data) -> dict`` (its ``split.json`` fields) and
    ``summary_line(report) -> str``. config: its config dataclass. model_kind: the
    ``mask_kind`` of the models it decomposes. mesh_axes / natural_axis: the device-mesh axes it
    splits (the default axis first). cli_fields: the config fields the CLI sets from flags.
    presets: named settings (empty: ``--recipe`` does not apply). configure(overrides, recipe,
    *, arch, dataset) -> (config, warnings, notes). run_warnings(config, train_images) -> why
    a run cannot do what it is run for. progress: the checkpoint its search resumes from (None:
    one pass). history_plot: the plot of its history (``cli.plots``), None for none.
    trained_by: the ``model.json`` key of what a base run trained *for* this method holds (MwT's
    generators): such a run is split by this method only, and ``run_artefacts(run_dir, model,
    meta)`` loads it as keyword arguments of ``split``.
    """

    name: str
    title: str
    package: ModuleType
    config: type
    model_kind: str
    mesh_axes: tuple[str, ...]
    cli_fields: tuple[str, ...]
    presets: Mapping[str, dict] = dataclasses.field(default_factory=dict)
    configure: Callable | None = None
    run_warnings: Callable = _no_warnings
    progress: str | None = None
    history_plot: str | None = None
    training: Training | None = None

    @property
    def natural_axis(self) -> str:
        return self.mesh_axes[0]

    def make_config(self, overrides: Mapping, recipe: str | None = None, *, arch: str = "", dataset: str = ""):
        """``(config, warnings, notes)`` of a run from a preset (``recipe``) and ``overrides``."""
        if self.configure is not None:
            return self.configure(dict(overrides), recipe, arch=arch, dataset=dataset)
        if recipe:
            with_presets = [m.name for m in METHODS.values() if m.presets]
            raise ValueError(f"--recipe applies to --method {' and '.join(with_presets)}")
        return self.config(**overrides), [], []

    @property
    def resumable(self) -> bool:
        return self.progress is not None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("grad", "GradSplitter", gradsplitter, gradsplitter.GradSplitterConfig, "kernel", ("modules", "data"),
           ("alpha", "head_epochs", "modularity_epochs", "lr_head", "lr_modularity", "batch_size", "init", "seed",
            "select_tolerance"),
           presets=gradsplitter.PRESETS, configure=gradsplitter_config.configure,
           run_warnings=gradsplitter_config.run_warnings, progress=gradsplitter_search.CKPT, history_plot="accuracy_vs_kernels"),
    Method("ga", "CNNSplitter", cnnsplitter, cnnsplitter.CNNSplitterConfig, "kernel", ("modules", "data"),
           ("population", "generations", "groups", "mutation_percent", "eval_images", "sensitivity_images",
            "early_stop", "sensitive", "algorithm", "sensitive_ratios", "other_ratios", "thresholds",
            "shared_initial_population", "importance_data", "seed"),
           presets=cnnsplitter.PRESETS, configure=cnnsplitter_config.configure, progress=cnnsplitter_search.CKPT,
           history_plot="fitness_over_generations"),
    Method("concern", "concern identification", concern, concern.ConcernConfig, "node", ("data",),
           ("negative_ratio", "backtrack", "residual", "delta", "bln_rule", "concerned_per_class", "min_confidence",
            "unconfident", "seed")),
    Method("mwt", "MwT", mwt, mwt.MwTSplitConfig, "kernel", ("data",), ("threshold", "step", "seed"),
           training=Training("mwt", mwt.MwTConfig, ("alpha", "beta"), "mwt", mwt.MwTObjective,
                             mwt_training.save_generators,
                             lambda run_dir, model, meta: {"generators": mwt_training.load_generators(run_dir, model, meta)},
                             "without its generators", (mwt_training.GENERATORS_DIR,))),
)}


def method(name: str) -> Method:
    """The record of method ``name``; ValueError naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def methods_for(model_kind: str) -> list[Method]:
    """The methods that decompose models of ``mask_kind`` ``model_kind``."""
    return [m for m in METHODS.values() if m.model_kind == model_kind]


def trained_for(meta: dict) -> Method | None:
    """The method a base run (its ``model.json`` ``meta``) was trained for, None for a plain model."""
    return next((m for m in trainers() if m.training.key in meta), None)


def trainers() -> list[Method]:
    """The methods that train their own base model (``Method.training``)."""
    return [m for m in METHODS.values() if m.training is not None]
