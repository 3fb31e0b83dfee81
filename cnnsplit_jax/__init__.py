"""cnnsplit-jax: decompose trained CNN classifiers into reusable per-class modules, in JAX.

The names a JAX user needs, flat (optax style)::

    import cnnsplit_jax as cs
    ds = cs.load_dataset("digits")                               # uint8 [N, 32, 32, C] + info
    model = cs.build_model("simcnn", num_classes=10, in_channels=1, width=0.125)
    model = cs.adapt(my_linen_cnn, variables, input_shape=(28, 28, 1))  # or your own Flax CNN
    result = cs.gradsplitter.split(key, model, data, cs.GradSplitterConfig())
    comp = cs.compose([cs.Pick(result.module_set, 3), ...])      # a pytree
    scores = jax.jit(cs.apply)(comp, x_uint8)                    # [B, K]

Packages, bottom to top: ``models`` (architectures, masks, conv, interop), ``data``,
``checkpoint``, ``train``, ``modules`` (module sets, heads, extraction, THE module forward),
``splitters`` (``gradsplitter``, ``cnnsplitter``, ``concern``, ``mwt``: one ``split`` API each,
one ``Method`` record each in ``METHODS``; MwT also trains: ``fit(..., objective=cs.MwTObjective())``),
``compose`` / ``evaluate`` / ``reuse``, ``pipeline`` (runs on disk), ``cli``; ``mesh`` (devices)
and ``distributed`` (several processes: call ``cs.distributed.initialize()`` before any JAX work).

Names are imported on first use (PEP 562), so ``import cnnsplit_jax`` loads neither JAX nor
anything else until a name is read, and ``python -m cnnsplit_jax`` can drop the current
directory from the import path before it imports a dependency.

The public API is what ``__all__`` lists here and in each subpackage; ``docs/api.md`` lists
every such name with its one-line docstring (checked by ``tests/test_api_docs.py``). Modules
inside a package (``splitters/gradsplitter/step.py`` ...) are internal: import from the package.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.3.0"

#: public name -> the module that defines it (a name equal to its module is that subpackage)
_NAMES = {
    **{n: "checkpoint" for n in ("CheckpointError", "UntrustedDefinitionError", "load_model", "save_model")},
    **{n: "compose" for n in ("ClassRef", "Composition", "apply", "compose", "predict_scores")},
    **{n: "data" for n in ("Dataset", "DatasetError", "DatasetInfo", "Normalization", "load_dataset", "load_task",
                           "normalize", "to_uint8")},
    "evaluate_module_set": "evaluate",
    **{n: "models" for n in ("ARCHITECTURES", "AdaptedCNN", "AdapterError", "InceCNN", "MaskedCNN", "ResCNN", "ResNet",
                             "SimCNN", "build_model", "count_params", "adapt", "kept_kernels", "load_variables",
                             "mask_points", "ones_masks", "total_kernels", "SplittableModel", "ModelCapabilityError",
                             "require")},
    **{n: "modules" for n in ("ConcernModuleSet", "ModuleSet", "Pick", "load_module_set", "module_outputs",
                              "save_module_set")},
    "Progress": "progress",
    **{n: "splitters" for n in ("CNNSplitterConfig", "ConcernConfig", "GradSplitterConfig", "SearchDivergedError",
                                "SplitData", "SplitResult", "cnnsplitter", "concern", "gradsplitter", "METHODS",
                                "Method", "mwt", "MwTConfig", "MwTObjective", "MwTSplitConfig")},
    **{n: "train" for n in ("TrainConfig", "TrainingDivergedError", "fit", "Objective")},
}
_SUBPACKAGES = ("checkpoint", "data", "distributed", "mesh", "models", "modules", "pipeline", "splitters")

__all__ = sorted([*_NAMES, *_SUBPACKAGES])


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: importing a submodule binds it to the package's attribute
    of the same name, and ``compose`` is the public function, not ``compose.py`` (which stays
    importable as ``cnnsplit_jax.compose`` through ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name in _NAMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what static tools see (the same names, imported eagerly)
    from . import checkpoint, data, distributed, mesh, models, modules, pipeline, splitters  # noqa: F401
    from .checkpoint import CheckpointError, UntrustedDefinitionError, load_model, save_model  # noqa: F401
    from .compose import ClassRef, Composition, apply, compose, predict_scores  # noqa: F401
    from .data import (Dataset, DatasetError, DatasetInfo, Normalization, load_dataset, load_task,  # noqa: F401
                       normalize, to_uint8)
    from .evaluate import evaluate_module_set  # noqa: F401
    from .models import (ARCHITECTURES, AdaptedCNN, AdapterError, InceCNN, MaskedCNN, ResCNN, ResNet,  # noqa: F401
                         ModelCapabilityError, SimCNN, SplittableModel, adapt, build_model, count_params,
                         kept_kernels, load_variables, mask_points, ones_masks, require, total_kernels)
    from .modules import ConcernModuleSet, ModuleSet, Pick, load_module_set, module_outputs, save_module_set  # noqa: F401
    from .progress import Progress  # noqa: F401
    from .splitters import (METHODS, CNNSplitterConfig, ConcernConfig, GradSplitterConfig, Method,  # noqa: F401
                            MwTConfig, MwTObjective, MwTSplitConfig, SearchDivergedError, SplitData, SplitResult,
                            cnnsplitter, concern, gradsplitter, mwt)
    from .train import Objective, TrainConfig, TrainingDivergedError, fit  # noqa: F401
