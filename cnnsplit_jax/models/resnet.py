"""CIFAR-style ResNet-20 / 32 / 56 (He et al. v1, as Pan & Rajan's Keras models), no BatchNorm.

Depth ``6n + 2``: a 3x3 stem conv (16 channels), three stages of ``n`` residual blocks with
16 / 32 / 64 channels (the first block of stages 2 and 3 has stride 2 and a 1x1 stride-2
projection shortcut, Keras' ``resnet_v1``), global 8x8 average pooling, one dense layer.
A block is ``relu(conv2(relu(conv1(x))) + shortcut(x))``. Pan & Rajan trained these models
without BatchNorm, which is the default here (``batch_norm`` stays False); to make that
trainable, every block's conv2 starts at He init / sqrt(blocks) (Fixup-style).

**Nodes.** Concern identification (``cnnsplit_jax.concern``) works on *nodes*: the
pre-activation values that a ReLU reads (or, for a residual sum's inputs, the values the Add
reads), one per output position ``(row, col, channel)``. ``ResNet.nodes(residual)`` lists them
in forward order under one of three mappings of a block's Add:

* ``"conv"`` (the paper's: maps for conv outputs only): the stem, every ``conv1``, every
  ``conv2`` (its output before the Add, a *branch* node) and every projection shortcut's
  output (``short``, stride-2 blocks only). An identity shortcut has no node: its value always
  reaches the Add.
* ``"conv_identity"``: as ``"conv"``, plus a ``short`` branch node for every identity
  shortcut, so the identity input is masked before the Add too (this library's ``"conv"``
  before 2026-12-04; module sets saved then are read as this mapping).
* ``"sum"``: the stem, every ``conv1`` and every block's residual sum ``add`` (conv2 +
  shortcut, masked at its ReLU), exact on concerned inputs.

``node_forward(x, keep)`` runs the model with ``keep = {node: float [H, W, C]}`` multipliers
(0 = position deactivated, the module's map; the names say which mapping) and can record
every node's values of all mappings.

Kernel-mask methods (GradSplitter, CNNSplitter) do not apply to these models (``mask_kind`` is
``"node"``): ``__call__`` refuses kernel masks, and ``cnnsplit split`` points to
``--method concern``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import jax

from .base import ConvSpec, Dense, MaskedCNN
from .protocol import DECLARED_GRAPH, POSITION_NODES

__all__ = ["Node", "ResNet", "ResNet20", "ResNet32", "ResNet56", "RESNETS", "RESIDUAL_MAPPINGS", "DEFAULT_RESIDUAL"]

#: how a residual block's Add is mapped to nodes (see the module docstring)
RESIDUAL_MAPPINGS = ("conv", "conv_identity", "sum")
#: the one default mapping (concern identification's, every ``nodes`` / ``feature_nodes`` call)
DEFAULT_RESIDUAL = "conv"


@dataclasses.dataclass(frozen=True)
class Node:
    """A layer of positions a module may deactivate: ``name``, ``shape`` (H, W, C) for 32x32
    images, ``kind`` (``"conv"``: a conv followed by ReLU; ``"add"``: a residual sum followed
    by ReLU; ``"branch"``: one input of a residual sum, before the Add) and the convs that
    produce it (none for an identity shortcut)."""

    name: str
    shape: tuple[int, int, int]
    kind: str
    convs: tuple[str, ...]

    @property
    def size(self) -> int:
        h, w, c = self.shape
        return h * w * c


class ResNet(MaskedCNN):
    """CIFAR ResNet v1 of depth ``6 * blocks + 2`` (subclasses fix ``blocks``)."""

    arch = "resnet"
    conv_init = "he"
    batch_norm = False
    mask_kind = "node"
    capabilities = frozenset({POSITION_NODES, DECLARED_GRAPH})
    blocks = 3
    fc_layers = ("fc",)

    def __init__(self, num_classes=10, in_channels=3, width=1.0, *, channels=None, rngs):
        super().__init__(num_classes, in_channels, width, channels=channels, rngs=rngs)
        # Without BN, He-initialised residual branches double the activation variance per
        # block (std x80 after 9 blocks, training stalls at chance). As Fixup (Zhang et al.
        # 2019), each branch's last conv starts scaled by 1/sqrt(number of blocks).
        scale = 1.0 / (3 * self.blocks) ** 0.5
        for s in range(3):
            for b in range(self.blocks):
                conv = getattr(self, f"s{s}b{b}_conv2")
                conv.kernel[...] = conv.kernel[...] * scale

    @classmethod
    def _base_topology(cls):
        specs = [ConvSpec("conv_0", 3, 16, (), "conv_0", 32)]
        prev, hw = "conv_0", 32
        for s, ch in enumerate((16, 32, 64)):
            for b in range(cls.blocks):
                stride = 2 if s > 0 and b == 0 else 1
                p = f"s{s}b{b}"
                specs.append(ConvSpec(f"{p}_conv1", 3, ch, (prev,), f"{p}_conv1", hw, stride))
                hw //= stride
                specs.append(ConvSpec(f"{p}_conv2", 3, ch, (f"{p}_conv1",), f"{p}_conv2", hw))
                if stride > 1:
                    specs.append(ConvSpec(f"{p}_short", 1, ch, (prev,), f"{p}_short", hw * 2, 2))
                prev = f"{p}_conv2"
        return tuple(specs)

    @property
    def fc_input_layers(self):  # the last block's conv2 (channels of the pooled features)
        return (f"s2b{self.blocks - 1}_conv2",)

    def _build_head(self, rngs):
        self.fc = Dense(self.fc_in, self.num_classes, rngs=rngs)

    def nodes(self, residual: Literal["conv", "conv_identity", "sum"] = DEFAULT_RESIDUAL) -> tuple[Node, ...]:
        """Nodes in forward order under a residual mapping (see the module docstring)."""
        if residual not in RESIDUAL_MAPPINGS:
            raise ValueError(f"residual must be one of {RESIDUAL_MAPPINGS}, got {residual!r}")
        out = {s.name: s.out_channels for s in self.topology}
        nodes = [Node("conv_0", (32, 32, out["conv_0"]), "conv", ("conv_0",))]
        hw = 32
        for s in range(3):
            for b in range(self.blocks):
                p = f"s{s}b{b}"
                down = s > 0 and b == 0
                hw //= 2 if down else 1
                shape = (hw, hw, out[f"{p}_conv2"])
                nodes.append(Node(f"{p}_conv1", (hw, hw, out[f"{p}_conv1"]), "conv", (f"{p}_conv1",)))
                if residual == "sum":
                    convs = (f"{p}_conv2", f"{p}_short") if down else (f"{p}_conv2",)
                    nodes.append(Node(f"{p}_add", shape, "add", convs))
                else:
                    nodes.append(Node(f"{p}_conv2", shape, "branch", (f"{p}_conv2",)))
                    if down or residual == "conv_identity":
                        nodes.append(Node(f"{p}_short", shape, "branch", (f"{p}_short",) if down else ()))
        return tuple(nodes)

    def feature_nodes(self, residual: Literal["conv", "conv_identity", "sum"] = DEFAULT_RESIDUAL
                      ) -> tuple[str, ...]:
        """The nodes whose positions the pooled features average: the last block's Add, or the
        branch nodes it merges (conv2's output; the shortcut's where it is a node). MC-BLN
        deactivates a removed feature in all of them (under ``"conv"`` the identity input
        still reaches the pool; the removed feature's head row is zeroed as well)."""
        p = f"s2b{self.blocks - 1}"
        if residual == "sum":
            return (f"{p}_add",)
        names = {nd.name for nd in self.nodes(residual)}
        return tuple(n for n in (f"{p}_conv2", f"{p}_short") if n in names)

    def _check_keep(self, keep):
        shapes = {n.name: n.shape for r in RESIDUAL_MAPPINGS for n in self.nodes(r)}
        self.check_named(keep, shapes, "node", "node mask")
        if keep is not None and any(k.endswith("_add") for k in keep) and any(
                k.endswith(("_conv2", "_short")) for k in keep):
            raise ValueError("node masks mix residual mappings (both '_add' nodes and branch nodes "
                             "'_conv2' / '_short')")

    def _run(self, x, keep, train, record):
        """Pooled features [B, F] (and the recorded pre-activations when ``record`` is a dict)."""

        def node(name, pre):
            if record is not None:
                record[name] = pre
            if keep is not None and name in keep:
                pre = pre * keep[name].astype(pre.dtype)
            return jax.nn.relu(pre)

        def branch(name, v):  # an input of a residual sum (the "conv" mapping's nodes)
            if record is not None:
                record[name] = v
            return v * keep[name].astype(v.dtype) if keep is not None and name in keep else v

        conv = lambda n, h: getattr(self, n)(h, train=train)  # noqa: E731
        h = node("conv_0", conv("conv_0", x))
        for s in range(3):
            for b in range(self.blocks):
                p = f"s{s}b{b}"
                a = node(f"{p}_conv1", conv(f"{p}_conv1", h))
                short = branch(f"{p}_short", conv(f"{p}_short", h) if s > 0 and b == 0 else h)
                h = node(f"{p}_add", branch(f"{p}_conv2", conv(f"{p}_conv2", a)) + short)
        return h.mean(axis=(1, 2))

    def _body(self, x, masks, train, rec=None):
        if masks is not None:
            raise ValueError(
                f"{self.arch} takes position masks (node_forward), not kernel masks: "
                "decompose it with `cnnsplit split --method concern`")
        return self._run(x, None, train, None)

    def _head(self, feats, train, key):
        return self.fc(feats)

    def node_forward(
        self,
        x: jax.Array,
        keep: Mapping[str, jax.Array] | None = None,
        *,
        record: bool = False,
    ):
        """Inference forward under node masks.

        Args:
          x: normalised images [B, 32, 32, C].
          keep: optional ``{node: float [H, W, C]}`` multipliers of the pre-activations
            (0 deactivates a position), nodes of one residual mapping (``_add`` nodes and
            branch nodes are not mixed); missing nodes are kept whole.
          record: also return ``{node: pre-activation [B, H, W, C]}`` (before ``keep``) for the
            nodes of every mapping.

        Returns:
          ``features [B, F]`` (the pooled input of ``fc``), plus the records if ``record``.
        """
        self.check_input(x)
        self._check_keep(keep)
        rec = {} if record else None
        feats = self._run(x, keep, False, rec)
        return (feats, rec) if record else feats


class ResNet20(ResNet):
    """ResNet-20: 3 blocks per stage, 19 conv layers (+2 projection shortcuts), 1 dense."""

    arch, blocks = "resnet20", 3


class ResNet32(ResNet):
    """ResNet-32: 5 blocks per stage."""

    arch, blocks = "resnet32", 5


class ResNet56(ResNet):
    """ResNet-56: 9 blocks per stage."""

    arch, blocks = "resnet56", 9


RESNETS: dict[str, type[ResNet]] = {c.arch: c for c in (ResNet20, ResNet32, ResNet56)}
