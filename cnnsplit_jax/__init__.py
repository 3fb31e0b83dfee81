"""cnnsplit-jax: decompose trained CNN classifiers into reusable per-class modules, in JAX.

Layout (one file per idea):

* ``models``     — Flax NNX SimCNN / ResCNN / InceCNN with named mask points
* ``resnet``     — CIFAR ResNet-20 / 32 / 56 (no BN) with ReLU-input *nodes*
* ``masks``      — model-generic mask-point helpers (sizes, all-ones masks, kernel counts)
* ``conv``       — convolutions that pick the fastest correct formulation per layer shape
* ``data``       — named datasets (digits, Fashion-MNIST, MNIST, CIFAR, SVHN), splits, batches
* ``train``      — base-model training / evaluation (reference recipe)
* ``checkpoint`` — Orbax checkpoints of models and resumable state
* ``interop``    — load the reference PyTorch state dicts (optional ``torch`` extra)
* ``gradsplitter`` — GradSplitter search (masks + heads, schedule, init/step/run)
* ``cnnsplitter`` (+ ``genome``, ``ga``, ``fitness``, ``importance``) — CNNSplitter GA search
* ``concern``    — Pan & Rajan's decomposition by concern identification (ResNets)
* ``compose`` / ``reuse`` — modules of many models as one pytree; reuse scenarios
* ``extract``    — standalone, physically smaller modules; FLOP counts
* ``module_set`` — saved module sets; ``evaluate`` — module metrics; ``plots`` — PNGs
* ``cli``        — the ``cnnsplit`` command
"""

from .conv import conv2d, select_conv_impl
from .data import DatasetError, load_dataset
from .checkpoint import CheckpointError, load_model, save_model
from .masks import kept_kernels, mask_points, ones_masks, total_kernels, count_params
from .models import ARCHITECTURES, InceCNN, MaskedCNN, ResCNN, SimCNN, build_model
from .resnet import ResNet

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "DatasetError",
    "InceCNN",
    "MaskedCNN",
    "ResCNN",
    "ResNet",
    "SimCNN",
    "build_model",
    "conv2d",
    "count_params",
    "kept_kernels",
    "load_dataset",
    "load_model",
    "mask_points",
    "ones_masks",
    "save_model",
    "select_conv_impl",
    "total_kernels",
]
