"""Models: the papers' CNNs (SimCNN, ResCNN, InceCNN and the weak patching models), CIFAR
ResNets for concern identification, their building blocks, mask-point helpers, convolution
formulations and PyTorch interop.

``build_model(arch, ...)`` builds any of ``ARCHITECTURES`` by name.
"""

from __future__ import annotations

import jax
from flax import nnx

from .adapted_io import load_variables
from .adapter import AdaptedCNN, AdapterError, adapt
from .base import IMAGE_SIZE, ConvBN, ConvSpec, Dense, MaskedCNN, MaskPoint, SampleGates, scaled
from .cnn import CNNS, InceCNN, ResCNN, ResCNNSVHNWeak, ResCNNWeak, SimCNN, SimCNNSVHNWeak, SimCNNWeak
from .masks import (count_params, effective_masks, flatten_masks, kept_kernels, kernel_multiplicity, mask_points,
                    ones_masks, total_kernels)
from .protocol import (DECLARED_GRAPH, KERNEL_MASKS, POSITION_NODES, USER_DEFINITION, ModelCapabilityError,
                       SplittableModel, has, require)
from .resnet import RESNETS, Node, ResNet, ResNet20, ResNet32, ResNet56
from .resnet18 import ResNet18
from .vgg import VGG16BN

__all__ = [
    "AdaptedCNN", "AdapterError", "adapt", "load_variables",
    "ARCHITECTURES", "IMAGE_SIZE", "ConvBN", "ConvSpec", "Dense", "InceCNN", "MaskPoint",
    "MaskedCNN", "Node", "SampleGates", "ResCNN", "ResCNNSVHNWeak", "ResCNNWeak", "ResNet", "ResNet20", "ResNet32", "ResNet56",
    "SimCNN", "SimCNNSVHNWeak", "VGG16BN", "ResNet18", "SimCNNWeak", "build_model", "count_params", "effective_masks", "flatten_masks", "kept_kernels",
    "kernel_multiplicity", "mask_points", "ones_masks", "scaled", "total_kernels",
    "DECLARED_GRAPH", "KERNEL_MASKS", "POSITION_NODES", "USER_DEFINITION", "ModelCapabilityError", "SplittableModel",
    "has", "require",
]

#: every architecture ``build_model`` knows, by name
ARCHITECTURES: dict[str, type[MaskedCNN]] = {**CNNS, VGG16BN.arch: VGG16BN, ResNet18.arch: ResNet18, **RESNETS}


def build_model(
    arch: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    key: jax.Array | int = 0,
    **kwargs,
) -> MaskedCNN:
    """Build an architecture by name (one of ``ARCHITECTURES``).

    Args:
      num_classes, in_channels, width: output classes, image channels, channel multiplier.
      key: a ``jax.random`` key or an int seed for parameter init.
      kwargs: architecture options (``fc_hidden`` for SimCNN, ``channels`` overrides).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    rngs = nnx.Rngs(params=key)
    return ARCHITECTURES[arch](num_classes, in_channels, width, rngs=rngs, **kwargs)
