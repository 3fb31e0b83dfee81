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
``splitters`` (``gradsplitter``, ``cnnsplitter``, ``concern``: one ``split`` API each),
``compose`` / ``evaluate`` / ``reuse``, ``pipeline`` (runs on disk), ``cli``; ``mesh`` (devices)
and ``distributed`` (several processes: call ``cs.distributed.initialize()`` before any JAX work).
"""

from . import checkpoint, data, distributed, mesh, models, modules, pipeline, splitters
from .checkpoint import CheckpointError, load_model, save_model
from .compose import ClassRef, Composition, apply, compose, predict_scores
from .data import Dataset, DatasetError, DatasetInfo, load_dataset, load_task, normalize
from .evaluate import evaluate_module_set
from .models import (ARCHITECTURES, AdaptedCNN, AdapterError, InceCNN, MaskedCNN, ResCNN, ResNet, SimCNN, build_model, count_params,
                     adapt, kept_kernels, load_variables, mask_points, ones_masks, total_kernels)
from .modules import ConcernModuleSet, ModuleSet, Pick, load_module_set, module_outputs, save_module_set
from .progress import Progress
from .splitters import (CNNSplitterConfig, ConcernConfig, GradSplitterConfig, SearchDivergedError, SplitData,
                        SplitResult, cnnsplitter, concern, gradsplitter)
from .train import TrainConfig, fit

__version__ = "0.2.0"

__all__ = [
    "ARCHITECTURES", "AdaptedCNN", "AdapterError", "adapt", "load_variables", "CNNSplitterConfig", "CheckpointError", "ClassRef", "Composition", "ConcernConfig",
    "ConcernModuleSet", "Dataset", "DatasetError", "DatasetInfo", "GradSplitterConfig", "InceCNN", "MaskedCNN",
    "ModuleSet", "Pick", "Progress", "ResCNN", "ResNet", "SearchDivergedError", "SimCNN", "SplitData",
    "SplitResult", "TrainConfig", "apply", "build_model", "checkpoint", "cnnsplitter", "compose", "concern",
    "count_params", "data", "distributed", "evaluate_module_set", "fit", "gradsplitter", "kept_kernels", "load_dataset",
    "load_model", "load_module_set", "load_task", "mask_points", "mesh", "models", "module_outputs", "modules",
    "normalize", "ones_masks", "pipeline", "predict_scores", "save_model", "save_module_set", "splitters",
    "total_kernels",
]
