"""The model contract every splitter, module set and composition reads, and the one way to ask
what a model can do.

Three families implement it: the zoo's kernel-mask CNNs (``MaskedCNN``: SimCNN, ResCNN,
InceCNN, the CNNSplitter and weak variants), the zoo's ResNets (position nodes) and users'
models through the adapter (``AdaptedCNN``, either kind). A model states its capabilities in
``capabilities``; code that needs one calls ``require(model, CAPABILITY, purpose)`` (one
message format) or branches on ``has(model, CAPABILITY)``, never on a probe of attributes.

Capabilities:

* ``KERNEL_MASKS``: ``masks={mask_point: [C]}`` gate conv kernels (GradSplitter, CNNSplitter,
  ``ModuleSet``);
* ``POSITION_NODES``: ``node_forward(x, keep)`` gates ReLU-input positions (concern
  identification, ``ConcernModuleSet``);
* ``DECLARED_GRAPH``: the layer graph is declared by the model (the zoo's ``ConvSpec``
  topology or ResNet blocks): extraction by kept indices, the weight Jaccard of concern
  modules, MC-BI's backward walk;
* ``USER_DEFINITION``: rebuilt from the user's code (``definition_spec()`` is what a run
  directory stores); its graph is traced, so extraction is checked per module and may be
  refused with its reason.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import jax

__all__ = ["KERNEL_MASKS", "POSITION_NODES", "DECLARED_GRAPH", "USER_DEFINITION", "CAPABILITY_KINDS",
           "ModelCapabilityError", "SplittableModel", "capabilities_of", "has", "require"]

KERNEL_MASKS = "kernel masks"
POSITION_NODES = "position nodes"
DECLARED_GRAPH = "a declared layer graph"
USER_DEFINITION = "a user's definition"

#: the capability a model's ``mask_kind`` ("kernel" / "node") stands for
CAPABILITY_KINDS = {"kernel": KERNEL_MASKS, "node": POSITION_NODES}


class ModelCapabilityError(ValueError):
    """A model lacks what an operation needs (``require``)."""


@runtime_checkable
class SplittableModel(Protocol):
    """What every model offers. Images are normalised NHWC ``[B, H, W, C]``
    (``input_shape``); logits ``[B, num_classes]``.

    arch: the zoo name or ``"adapted:<class>"``. mask_kind: ``"kernel"`` or ``"node"``.
    capabilities: the constants above. ``mask_points()``: the kernel masks' points (empty for
    position-node models of the zoo). ``gate_layers()``: ``(layer, C_in, C_out)`` of the convs
    that read another conv's output, which per-sample gates (``SampleGates``) may gate. ``__call__(x, masks=None, *, train=False)``: the
    (masked) forward. ``kernel_maps(x, masks)``: post-ReLU outputs per conv. ``features``
    / ``fc_chain``: the FC input and the FC layers from it. ``config()``: what rebuilds it.
    ``definition_spec()``: the user's definition to store (None for zoo models, which
    ``config()`` rebuilds).
    """

    arch: str
    num_classes: int
    in_channels: int
    mask_kind: str
    capabilities: frozenset

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    def __call__(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None, *,
                 train: bool = False) -> jax.Array: ...

    def mask_points(self) -> tuple: ...

    def gate_layers(self) -> tuple: ...

    def kernel_maps(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None) -> dict: ...

    def features(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None) -> jax.Array: ...

    def fc_chain(self, h: jax.Array, start: int = 0, stop: int | None = None) -> jax.Array: ...

    def config(self) -> dict: ...

    def check_input(self, x) -> None: ...

    def definition_spec(self) -> dict | None: ...


def capabilities_of(model) -> frozenset:
    """The capabilities ``model`` declares."""
    return frozenset(model.capabilities)


def has(model, capability: str) -> bool:
    """Whether ``model`` declares ``capability``."""
    return capability in model.capabilities


def require(model, capability: str, purpose: str, hint: str = "") -> None:
    """Raise ``ModelCapabilityError`` unless ``model`` has ``capability``, in one format:
    ``"<purpose> needs a model with <capability>; <arch> has <its capabilities> (<hint>)"``."""
    if capability in model.capabilities:
        return
    arch = getattr(model, "arch", type(model).__name__)
    own = " and ".join(sorted(model.capabilities)) or "none of them"
    raise ModelCapabilityError(f"{purpose} needs a model with {capability}; {arch} has {own}"
                               + (f" ({hint})" if hint else ""))
