"""Bring your own model: a user's Flax CNN (NNX or Linen, any input size) seen through mask
points (kernel masks) or nodes (position maps), so that the splitters and composition run on
it unchanged.

``adapt(model, variables=None, *, input_shape, ...)`` runs the model once on zeros and
records, in call order, every conv, normalisation (``BatchNorm``, ``GroupNorm``,
``LayerNorm``) and dense call of Linen or NNX (``models.intercept``). Each conv gets a *mask
point* of its output channels, placed where masking a channel equals dropping that kernel:

* after the normalisation that reads the conv's output directly (``norm(conv(x))``), else
  at the conv's output;
* before the activation: for ReLU-like activations (``f(0) = 0``, positively homogeneous)
  ``f(m * y) = m * f(y)`` for m in {0, 1}, so a binary mask gates the activated output.

``kind="kernel"`` (default): an ``AdaptedCNN`` with the zoo's interface for kernel masks
(``mask_points()``, ``topology``, ``__call__(x, masks)``, ``kernel_maps``): masks are
``{point: float [C]}``, a point name is the conv's path (``"Conv_0"``, ``"blocks/2/proj"``).
Convs whose outputs are added (a residual block's last conv and its shortcut, identity or
projected) share one mask point, as the zoo's ResCNN pairs do: ``ties="auto"`` discovers them
from the traced graph (``models.ties``), ``ties="none"`` gives every conv its own point (exact
for the masked forward too, but such modules cannot be sliced), or groups are declared.
Kernels are counted per gated conv as for the zoo. The zoo's own models adapt to the points
they declare (their ``ConvBN`` layers are intercepted like a user's convs).

``kind="node"``: the same places as *nodes* of concern identification, a ``[H, W, C]``
position map each (every conv output, after its normalisation: the paper's mapping, where a
residual sum's inputs are masked before the Add), with ``node_forward`` returning the input
of the final dense layer (which must produce the logits) and ``fc`` that layer. MC-BLN's
removed features are removed from the channeled head (no pooling is assumed); MC-BI, which
walks a known graph, is refused.

Physical extraction of modules (conv chains and tied residual graphs):
``modules.extract_adapted``. Saving and loading (the user's parameters, the definition a
model is rebuilt from): ``models.adapted_io``.
"""

from __future__ import annotations

from typing import Literal, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from .adapted_io import definition_of
from .base import ConvSpec, MaskedCNN, MaskPoint
from .intercept import AdapterError, LayerCall, discover, intercept_nnx, linen_interceptor
from .resnet import Node
from .ties import trace_channels

__all__ = ["adapt", "AdaptedCNN", "AdapterError", "LayerCall", "discover", "DenseHead"]


class DenseHead(NamedTuple):
    """The final dense layer of an adapted model: ``feats [B, F] @ kernel [F, K] + bias [K]``."""

    kernel: jax.Array
    bias: jax.Array

    def __call__(self, feats):
        return feats @ self.kernel + self.bias


# ---------------------------------------------------------------------------- the model
class AdaptedCNN(nnx.Module):
    """A user's Flax CNN with kernel masks or position nodes (see the module docstring).

    Attributes: ``arch`` (``"adapted:<class name>"``), ``mask_kind`` (``"kernel"`` or
    ``"node"``), ``num_classes``, ``in_channels``, ``input_shape`` (H, W, C), ``calls`` (the
    ``LayerCall``s discovered), ``topology`` (one ``ConvSpec`` per conv: path, kernel size,
    channels, its mask point; ``inputs`` are not known, so extraction is refused), ``fc_in``
    (the final dense layer's input width; 0 when the logits do not come from one).
    """

    mask_kind = "kernel"
    #: a user's model: modules are extracted by ``modules.extract_adapted``, saved with the
    #: definition it was adapted from (``checkpoint.save_model``)
    adapted = True
    batch_norm = False
    width = 1.0
    fc_layers: tuple[str, ...] = ()

    def __init__(self, net, variables, *, input_shape, num_classes, points, calls, apply_kwargs, name,
                 kind="kernel", head=None, definition=None):
        self.net = net if isinstance(net, nnx.Module) else nnx.static(net)
        self.linen = not isinstance(net, nnx.Module)
        self.variables = nnx.data(_wrap(variables)) if self.linen else None
        self._kwargs = tuple(sorted(dict(apply_kwargs).items()))  # static and hashable, as the graphdef needs
        self.input_shape = tuple(int(v) for v in input_shape)
        self.in_channels = self.input_shape[-1]
        self.num_classes = int(num_classes)
        self.arch = f"adapted:{name}"
        self.calls = tuple(calls)
        self._points = tuple(points)  # MaskPoint(name, size, conv paths)
        where = {}  # layer path -> point name, for the layer whose output is masked
        by_path = {c.path: c for c in self.calls}
        order = [c.path for c in self.calls]
        for p in self._points:
            for conv in p.layers:
                i = order.index(conv)
                nxt = self.calls[i + 1] if i + 1 < len(self.calls) else None
                at = nxt.path if nxt is not None and nxt.kind == "norm" and nxt.reads_previous else conv
                where[at] = p.name
        self._where_items = tuple(where.items())
        self.topology = tuple(ConvSpec(c, by_path[c].ksize, p.size, (), p.name,
                                       by_path[c].out_shape[0] * by_path[c].stride, by_path[c].stride)
                              for p in self._points for c in p.layers)
        self.mask_kind = kind
        self._head = head
        self._nodes = tuple(Node(name, by_path[at].out_shape, "conv", ()) for at, name in where.items())
        self.fc_in = int(self.fc.kernel.shape[0]) if head is not None else 0
        self.definition = definition

    def spec(self) -> dict:
        """What rebuilds this model from its saved variables (``checkpoint.save_model``): the
        definition's import path, ``adapt``'s arguments and the mask points as adapted."""
        return {"definition": self.definition, "input_shape": list(self.input_shape), "kind": self.mask_kind,
                "num_classes": self.num_classes, "name": self.arch.partition(":")[2],
                "apply_kwargs": dict(self._kwargs), "framework": "linen" if self.linen else "nnx",
                "points": [[p.name, list(p.layers)] for p in self._points]}

    @property
    def _where(self) -> dict[str, str]:
        """Layer path -> the mask point (node) whose values that layer's output carries."""
        return dict(self._where_items)

    # --- the zoo's interface ------------------------------------------------------------
    def mask_points(self) -> tuple[MaskPoint, ...]:
        """Mask points in forward order of their first conv."""
        return self._points

    def config(self) -> dict:
        """Structure description (two adapted models with equal configs stack in one vmap):
        the layers' paths and output shapes stand in for the user's class."""
        return {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "width": 1.0, "input_shape": list(self.input_shape),
                "layers": [[c.path, list(c.out_shape)] for c in self.calls]}

    def check_input(self, x) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, *input_shape]``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.arch} expects images [B, {', '.join(map(str, self.input_shape))}] (NHWC), "
                             f"got shape {tuple(x.shape)}")

    check_named = MaskedCNN.check_named  # the zoo's check (it reads only ``arch``)

    def _run(self, x, fn, *, around: bool = False):
        """The user's forward pass on x with every conv / norm / dense call hooked (``intercept``)."""
        if self.linen:
            with nn.intercept_methods(linen_interceptor(fn, around=around)):
                return self.net.apply(self.linen_variables(), x, **dict(self._kwargs))
        with intercept_nnx(self.net, fn, around=around):
            return self.net(x, **dict(self._kwargs))

    def linen_variables(self) -> dict:
        """The Linen variables as plain arrays."""
        return jax.tree.map(lambda v: v[...], self.variables, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def layer_arrays(self, path: str) -> dict[str, jax.Array]:
        """``{"kernel", "bias", "scale", "mean", "var": array}`` (those present) of the layer at
        ``path``."""
        names = ("kernel", "bias", "scale", "mean", "var")
        if self.linen:
            out = {}
            for col in self.linen_variables().values():
                tree = col
                for part in path.split("/"):
                    tree = tree.get(part, {}) if isinstance(tree, Mapping) else {}
                out.update({k: jnp.asarray(v) for k, v in tree.items() if k in names})
            return out
        layer = dict(("/".join(map(str, p)), m) for p, m in nnx.iter_modules(self.net))[path]
        return {k: getattr(layer, k)[...] for k in names if getattr(layer, k, None) is not None}

    def __call__(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None, *, train: bool = False,
                 dropout_key=None, dropout: bool = True) -> jax.Array:
        """Logits [B, num_classes] of normalised images x [B, *input_shape] under ``masks``
        ``{point: [C]}`` (missing points: all ones). Inference only: ``train=True`` is refused
        (the user's training loop owns training)."""
        if train:
            raise ValueError(f"{self.arch} is an adapted model: train it with your own loop, then adapt it")
        self.check_input(x)
        self.check_named(masks, {p.name: (p.size,) for p in self._points}, "mask point", "mask")
        if not masks:
            return self._run(x, lambda path, kind, layer, xin, out: out)
        where = self._where

        def fn(path, kind, layer, xin, out):
            name = where.get(path)
            if name is None or name not in masks:
                return out
            return out * masks[name].astype(out.dtype)

        return self._run(x, fn)

    def kernel_maps(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None) -> dict:
        """``{point: [B, H, W, C]}``: each mask point's (masked) output after a ReLU, whose
        per-channel sums are CNNSplitter's kernel importance (the zoo's post-ReLU maps; the
        ReLU is applied here, so the importance assumes ReLU-like activations)."""
        self.check_input(x)
        rec: dict = {}
        where = self._where

        def fn(path, kind, layer, xin, out):
            name = where.get(path)
            if name is None:
                return out
            if masks is not None and name in masks:
                out = out * masks[name].astype(out.dtype)
            rec[name] = jax.nn.relu(out)
            return out

        self._run(x, fn)
        return rec

    def channel_graph(self, order: list[str] | None = None) -> tuple[list[tuple[str, ...]], dict]:
        """``(ties, reads)`` from one trace of the masked forward (``models.ties``): groups of
        this model's mask points combined channel by channel (none left when the model is
        tied as discovered), and for every conv and dense layer the set of points (or
        ``IMAGE``) whose channels its input carries."""
        readers = {c.path: int(self.layer_arrays(c.path)["kernel"].shape[-2]) for c in self.calls
                   if c.kind in ("conv", "dense")}
        where = self._where

        def forward(masks, probes, x):
            def fn(path, kind, layer, xin, call):
                if path in probes:
                    xin = xin * probes[path].astype(xin.dtype)
                out = call(xin)
                name = where.get(path)
                return out * masks[name].astype(out.dtype) if name in masks else out

            return self._run(x, fn, around=True)

        return trace_channels(forward, {p.name: p.size for p in self._points}, readers, self.input_shape, order)

    # --- concern identification's interface (kind="node") ---------------------------------
    def nodes(self, residual: str = "conv") -> tuple[Node, ...]:
        """One node per mask point's place ([H, W, C] of its output), in call order; an
        adapted model has one mapping (every conv output: ``residual`` is ignored)."""
        return self._nodes

    def feature_nodes(self, residual: str = "conv") -> tuple[str, ...]:
        """None: the pooling before the final dense layer is not known, so MC-BLN removes a
        feature from the channeled head instead of deactivating its positions."""
        return ()

    @property
    def fc(self) -> DenseHead:
        """The final dense layer (its kernel [F, K] and bias [K])."""
        if self._head is None:
            raise AdapterError(f"{self.arch}: the logits do not come from a dense layer (nn.Dense / nnx.Linear) "
                               "called last, which concern identification channels")
        arrays = self.layer_arrays(self._head)
        kernel, bias = arrays["kernel"], arrays.get("bias")
        return DenseHead(kernel, jnp.zeros(kernel.shape[1], kernel.dtype) if bias is None else bias)

    def node_forward(self, x: jax.Array, keep: Mapping[str, jax.Array] | None = None, *, record: bool = False):
        """Input of the final dense layer [B, F] of normalised images x under position maps
        ``keep`` ``{node: float [H, W, C]}`` (0 deactivates), and with ``record`` every node's
        values before ``keep`` (as ``ResNet.node_forward``)."""
        self.check_input(x)
        self.check_named(keep, {n.name: n.shape for n in self._nodes}, "node", "node mask")
        if self._head is None:
            self.fc.kernel  # noqa: B018 - raises the explanation
        rec = {} if record else None
        feats = {}
        where, head = self._where, self._head

        def fn(path, kind, layer, xin, out):
            if path == head:
                feats["f"] = xin.reshape(xin.shape[0], -1)
                return out
            name = where.get(path)
            if name is None:
                return out
            if rec is not None:
                rec[name] = out
            return out * keep[name].astype(out.dtype) if keep is not None and name in keep else out

        self._run(x, fn)
        return (feats["f"], rec) if record else feats["f"]

    def features(self, x, masks=None):
        """The logits (an adapted model's head is not separable): ``fc_chain`` is the identity."""
        return self(x, masks)

    def fc_chain(self, h, start: int = 0, stop: int | None = None):
        return h


def _wrap(variables):
    def wrap(col, tree):
        kind = nnx.Param if col == "params" else nnx.BatchStat if col == "batch_stats" else nnx.Variable
        return jax.tree.map(kind, tree)

    return {col: wrap(col, tree) for col, tree in dict(variables).items()}


# ------------------------------------------------------------------------------- adapt
def adapt(
    net,
    variables: Mapping | None = None,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    mask_points: Sequence[str] | None = None,
    ties: Sequence[Sequence[str]] | str = "auto",
    apply_kwargs: Mapping | None = None,
    name: str | None = None,
    kind: Literal["kernel", "node"] = "kernel",
    definition: str | None = None,
) -> AdaptedCNN:
    """Adapt a trained Flax CNN for the kernel-mask splitters and composition.

    Args:
      net: an ``nnx.Module`` called as ``net(x, **apply_kwargs)`` (put it in eval mode, e.g.
        ``net.eval()``), or a Linen module applied as ``net.apply(variables, x, **apply_kwargs)``
        (e.g. ``apply_kwargs={"train": False}``).
      variables: the Linen module's variables (``{"params": ..., "batch_stats": ...}``).
      input_shape: (H, W, C) of one normalised image.
      num_classes: checked against the logits' width (read from it when None).
      mask_points: conv paths that get a mask point (default: every conv discovered).
      ties: ``"auto"`` (default): convs whose outputs are combined channel by channel (a
        residual sum: a block's last conv and its shortcut, identity or projected) share one
        mask point, discovered from the traced graph (``models.ties``); ``"none"``: every conv
        its own point; or explicit groups of conv paths. A group is named after its first
        conv in call order. Position nodes (``kind="node"``) are never tied.
      name: shown in ``arch`` (default: the class name).
      kind: ``"kernel"`` (GradSplitter, CNNSplitter) or ``"node"`` (concern identification:
        needs the logits to come from a final dense layer; no ties).
      definition: ``"package.module:name"``, a callable with no arguments returning the
        model's structure (``models.adapted_io``): what ``checkpoint.save_model`` records so
        that the model and its module sets load again (a Linen class with default fields is
        found by itself).

    Raises:
      AdapterError: no conv layer, a declared path that is not a conv, tied convs of different
        widths, logits that are not [1, K] or disagree with ``num_classes``, or a forward
        pass that fails on ``input_shape``.
    """
    if isinstance(net, nnx.Module) == (variables is not None):
        raise AdapterError("pass an NNX module alone, or a Linen module with its variables")
    if len(tuple(input_shape)) != 3:
        raise AdapterError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
    if kind not in ("kernel", "node"):
        raise AdapterError(f"kind must be 'kernel' or 'node', got {kind!r}")
    auto = isinstance(ties, str)
    if auto and ties not in ("auto", "none"):
        raise AdapterError(f"ties must be 'auto', 'none' or groups of conv paths, got {ties!r}")
    if kind == "node" and not auto and ties:
        raise AdapterError("ties gate kernels; position nodes (kind='node') are never tied")
    auto, ties = auto and ties == "auto" and kind == "kernel", (() if auto else ties)
    definition = definition_of(net, definition)
    calls, out, final_dense = discover(net, variables, input_shape=input_shape, apply_kwargs=apply_kwargs)
    if kind == "node" and final_dense is None:
        raise AdapterError(f"{type(net).__name__}: concern identification needs the logits to be the output of a "
                           "dense layer (nn.Dense / nnx.Linear) called last")
    convs = {c.path: c for c in calls if c.kind == "conv"}
    if not convs:
        raise AdapterError(f"{type(net).__name__} has no conv layer that could be intercepted (flax Conv); "
                           "the kernel-mask methods need at least one")
    if len(out) != 2:
        raise AdapterError(f"the model's output must be logits [B, K]; got shape {out}")
    if num_classes is not None and out[1] != num_classes:
        raise AdapterError(f"num_classes={num_classes} but the model's logits have {out[1]} columns")
    if len({c.path for c in calls}) != len(calls):
        raise AdapterError("a conv, norm or dense layer is called more than once per forward pass (weight sharing); "
                           "declare mask_points explicitly for layers called once")
    chosen = list(convs) if mask_points is None else list(mask_points)
    unknown = [p for p in chosen + [q for g in ties for q in g] if p not in convs]
    if unknown:
        raise AdapterError(f"no conv layer at path(s) {unknown}; the convs found are {list(convs)}")
    order = list(convs)
    build = lambda pts: AdaptedCNN(  # noqa: E731
        net, variables, input_shape=input_shape, num_classes=out[1], points=pts, calls=calls,
        apply_kwargs=apply_kwargs or {}, name=name or type(net).__name__, kind=kind, head=final_dense,
        definition=definition)
    if auto:  # every chosen conv its own point, then the points combined channel by channel share one
        ties = build(_group(convs, chosen, ())).channel_graph(order)[0]
    return build(_group(convs, chosen, ties))


def _group(convs: Mapping[str, LayerCall], chosen: Sequence[str], ties) -> list[MaskPoint]:
    """Mask points of the ``chosen`` convs (in call order), tied groups sharing one (named
    after the group's first conv)."""
    tied = {q: g[0] for g in ties for q in g}
    groups: dict[str, list[str]] = {}
    for path in [c for c in convs if c in set(chosen) | set(tied)]:
        groups.setdefault(tied.get(path, path), []).append(path)
    points = []
    for head, members in groups.items():
        sizes = {convs[m].out_shape[-1] for m in members}
        if len(sizes) != 1:
            raise AdapterError(f"tied convs {members} have different output channels {sorted(sizes)}")
        points.append(MaskPoint(head, sizes.pop(), tuple(members)))
    return points
