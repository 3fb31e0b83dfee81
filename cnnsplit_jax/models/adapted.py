"""The model ``adapt`` returns: a user's Flax CNN (NNX or Linen) with kernel masks or position
nodes at the places ``models.adapter`` found and verified (see there), offering the zoo's
interface (``mask_points``, ``__call__(x, masks)``, ``kernel_maps``) and concern
identification's (``nodes``, ``node_forward``, ``fc``)."""

from __future__ import annotations

import contextlib
from typing import Mapping, NamedTuple

import jax
import flax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from .base import ConvSpec, MaskedCNN, MaskPoint, SampleGates
from .protocol import CAPABILITY_KINDS, USER_DEFINITION
from .intercept import AdapterError, intercept_nnx, linen_interceptor
from .resnet import DEFAULT_RESIDUAL, Node
from .ties import trace_channels

__all__ = ["AdaptedCNN", "DenseHead", "LinenDefinition"]


class DenseHead(NamedTuple):
    """The final dense layer of an adapted model: ``feats [B, F] @ kernel [F, K] + bias [K]``."""

    kernel: jax.Array
    bias: jax.Array

    def __call__(self, feats):
        return feats @ self.kernel + self.bias


class _LinenTraining(NamedTuple):
    """A Linen model's training forward: the dropout key (None: no dropout rng)."""

    dropout_key: object


def _is_variable(v) -> bool:
    return isinstance(v, nnx.Variable)


class LinenDefinition:
    """A Linen module held as a static attribute of the graph: equal when the modules are
    equal, hashed by class (a Linen module with a list field, e.g. Flax's ImageNet ResNet's
    ``stage_sizes``, cannot be hashed itself, and jit hashes static attributes)."""

    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module

    def __eq__(self, other):
        if not isinstance(other, LinenDefinition):
            return NotImplemented
        if self.module is other.module:
            return True
        try:
            return bool(self.module == other.module)
        except Exception:  # fields that cannot be compared
            return False

    def __hash__(self):
        return hash(type(self.module))


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
    batch_norm = False
    width = 1.0
    fc_layers: tuple[str, ...] = ()

    def __init__(self, net, variables, *, input_shape, num_classes, points, calls, apply_kwargs, name,
                 kind="kernel", head=None, definition=None, placements=None, train_kwargs=None):
        self.net = net if isinstance(net, nnx.Module) else nnx.static(LinenDefinition(net))
        self.linen = not isinstance(net, nnx.Module)
        self.variables = nnx.data(_wrap(variables)) if self.linen else None
        self._kwargs = tuple(sorted(dict(apply_kwargs).items()))  # static and hashable, as the graphdef needs
        self._train_kwargs = None if train_kwargs is None else tuple(sorted(dict(train_kwargs).items()))
        self.input_shape = tuple(int(v) for v in input_shape)
        self.in_channels = self.input_shape[-1]
        self.num_classes = int(num_classes)
        self.arch = f"adapted:{name}"
        self.calls = tuple(calls)
        # a Linen model's training flag is its own call argument: without train_kwargs, its
        # BatchNorms cannot be switched to batch statistics, so it cannot train here
        self._linen_batch_norm_untrainable = self.linen and self._train_kwargs is None and any(
            c.kind == "norm" and c.layer_class == "BatchNorm" for c in self.calls)
        self._points = tuple(points)  # MaskPoint(name, size, conv paths)
        where, at_layer = {}, {}  # layer path -> point name, for the layer whose output is masked
        by_path = {c.path: c for c in self.calls}
        order = [c.path for c in self.calls]
        placements = dict(placements or {})
        for p in self._points:
            for conv in p.layers:
                i = order.index(conv)
                nxt = self.calls[i + 1] if i + 1 < len(self.calls) else None
                after_norm = nxt is not None and nxt.kind == "norm" and nxt.reads_previous
                at = nxt.path if after_norm and placements.get(conv, "norm") == "norm" else conv
                where[at], at_layer[conv] = p.name, at
        self._at_items = tuple(at_layer.items())
        self._where_items = tuple(where.items())
        self.topology = tuple(ConvSpec(c, by_path[c].ksize, p.size, (), p.name,
                                       by_path[c].out_shape[0] * by_path[c].stride, by_path[c].stride)
                              for p in self._points for c in p.layers)
        self.mask_kind = kind
        self._head = head
        self._nodes = tuple(Node(name, by_path[at].out_shape, "conv", ()) for at, name in where.items())
        self.fc_in = int(self.fc.kernel.shape[0]) if head is not None else 0
        self.definition = definition

    @property
    def capabilities(self) -> frozenset:
        """A user's model: modules are extracted by ``modules.extract_adapted`` (traced graph),
        saved with the definition it was adapted from (``definition_spec``)."""
        return frozenset({CAPABILITY_KINDS[self.mask_kind], USER_DEFINITION})

    def definition_spec(self) -> dict:
        """``spec()``: what ``checkpoint.save_model`` stores to rebuild this model."""
        return self.spec()

    def spec(self) -> dict:
        """What rebuilds this model from its saved variables (``checkpoint.save_model``): the
        definition's import path, ``adapt``'s arguments and the mask points as adapted."""
        return {"definition": self.definition, "input_shape": list(self.input_shape), "kind": self.mask_kind,
                "num_classes": self.num_classes, "name": self.arch.partition(":")[2],
                "apply_kwargs": dict(self._kwargs), "framework": "linen" if self.linen else "nnx",
                "train_kwargs": None if self._train_kwargs is None else dict(self._train_kwargs),
                "points": [[p.name, list(p.layers)] for p in self._points], "placements": self.placements()}

    def placement_layer(self, conv: str) -> str:
        """The layer whose output carries ``conv``'s mask: the norm that reads the conv, or the
        conv itself."""
        return dict(self._at_items)[conv]

    def placements(self) -> dict[str, str]:
        """``{conv: "norm" | "conv"}``: whether each masked conv's mask lies after its norm or at
        its own output (``adapt`` verifies which one drops the kernel)."""
        return {c: "conv" if at == c else "norm" for c, at in self._at_items}

    @property
    def _where(self) -> dict[str, str]:
        """Layer path -> the mask point (node) whose values that layer's output carries."""
        return dict(self._where_items)

    # --- the zoo's interface ------------------------------------------------------------
    def mask_points(self) -> tuple[MaskPoint, ...]:
        """Mask points in forward order of their first conv."""
        return self._points

    def gate_layers(self) -> tuple[tuple[str, int, int], ...]:
        """``(conv path, C_in, C_out)`` of every masked conv but the first conv called (taken
        to read the image); C_in from the conv's kernel (times its groups)."""
        first = next(c.path for c in self.calls if c.kind == "conv")
        by_path = {c.path: c for c in self.calls}
        return tuple((s.name, int(self.layer_arrays(s.name)["kernel"].shape[-2]) * by_path[s.name].groups,
                      s.out_channels) for s in self.topology if s.name != first)

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

    def _run(self, x, fn, *, around: bool = False, training: _LinenTraining | None = None):
        """The user's forward pass on x with every conv / norm / dense call hooked (``intercept``);
        a Linen model's training forward with ``training`` (its new running statistics are
        written back)."""
        if self.linen and training is not None:
            rngs = {} if training.dropout_key is None else {"dropout": training.dropout_key}
            with nn.intercept_methods(linen_interceptor(fn, around=around)):
                try:
                    out, updates = self.net.module.apply(self.linen_variables(), x, mutable=["batch_stats"],
                                                         rngs=rngs, **dict(self._train_kwargs))
                except flax.errors.InvalidRngError as e:
                    raise ValueError(f"{self.arch}'s training forward (train_kwargs={dict(self._train_kwargs)}) "
                                     "runs a Dropout, which needs a key: pass dropout_key (a recipe without dropout "
                                     "needs train_kwargs that switch it off)") from e
            for var, new in zip(jax.tree.leaves(self.variables.get("batch_stats", {}), is_leaf=_is_variable),
                                jax.tree.leaves(updates.get("batch_stats", {}))):
                var[...] = new
            return out
        if self.linen:
            with nn.intercept_methods(linen_interceptor(fn, around=around)):
                return self.net.module.apply(self.linen_variables(), x, **dict(self._kwargs))
        with intercept_nnx(self.net, fn, around=around):
            return self.net(x, **dict(self._kwargs))

    def linen_variables(self) -> dict:
        """The Linen variables as plain arrays."""
        return jax.tree.map(lambda v: v[...], self.variables, is_leaf=_is_variable)

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
        ``{point: [C]}`` (missing points: all ones), or under ``SampleGates`` (per-sample masks
        of the gated convs, from each conv's input, at its mask's place: after its norm or at its
        output). ``train=True`` runs the training forward: an NNX model's ``nnx.BatchNorm``
        layers normalise with the batch's statistics and update their running averages (with
        the user's momentum), as the model's own ``train()`` mode; dropout, if any, stays as
        ``apply_kwargs`` set it. A Linen model adapted with ``train_kwargs`` is applied with
        them, ``mutable=["batch_stats"]`` and ``dropout_key`` (when ``dropout``), and its new
        running statistics are written back; a Linen model with ``BatchNorm`` adapted without
        them is refused (its training flag is the user's call argument)."""
        training = None
        if train and self.linen and self._train_kwargs is not None:
            training = _LinenTraining(dropout_key if dropout else None)
        elif train and self._linen_batch_norm_untrainable:
            raise ValueError(f"{self.arch} is an adapted Linen model with BatchNorm, adapted without the call "
                             "arguments of its training forward: adapt it with train_kwargs (e.g. {'train': True}) "
                             "to train it here")
        self.check_input(x)
        with self._batch_norms_training(train):
            return self._forward(x, masks, training)

    @contextlib.contextmanager
    def _batch_norms_training(self, train: bool):
        """Within the block, every ``nnx.BatchNorm`` of an NNX model normalises with batch
        statistics and updates its running averages (``train``), as ``nnx.Module.train()``
        sets them, without switching on the model's dropout."""
        norms = [m for _, m in nnx.iter_modules(self.net) if isinstance(m, nnx.BatchNorm)] \
            if train and not self.linen else []
        saved = [m.use_running_average for m in norms]
        try:
            for m in norms:
                m.use_running_average = False
            yield
        finally:
            for m, v in zip(norms, saved):
                m.use_running_average = v

    def _forward(self, x, masks, training=None):
        if isinstance(masks, SampleGates):
            return self._gated(x, masks, training)
        self.check_named(masks, {p.name: (p.size,) for p in self._points}, "mask point", "mask")
        if not masks:
            return self._run(x, lambda path, kind, layer, xin, out: out, training=training)
        where = self._where

        def fn(path, kind, layer, xin, out):
            name = where.get(path)
            if name is None or name not in masks:
                return out
            return out * masks[name].astype(out.dtype)

        return self._run(x, fn, training=training)

    def _gated(self, x, gates: SampleGates, training=None):
        convs = {c for c, _ in self._at_items}
        unknown = set(gates.layers) - convs
        if unknown:
            raise ValueError(f"unknown gated layer(s) {sorted(unknown)} for {self.arch}; expected convs of "
                             f"{sorted(convs)}")
        conv_at = {at: conv for conv, at in self._at_items if conv in gates.layers}
        inputs = {}

        def fn(path, kind, layer, xin, out):
            if path in gates.layers:  # the conv's own call: keep its input for its gate
                inputs[path] = xin
            conv = conv_at.get(path)
            if conv is not None:
                out = out * gates(conv, inputs[conv])[:, None, None, :].astype(out.dtype)
            return out

        return self._run(x, fn, training=training)

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
    def nodes(self, residual: str = DEFAULT_RESIDUAL) -> tuple[Node, ...]:
        """One node per mask point's place ([H, W, C] of its output), in call order. An
        adapted model has one mapping, ``"conv"`` (every conv output after its norm; a residual
        sum's inputs masked before the Add); any other ``residual`` is refused."""
        if residual != "conv":
            raise ValueError(f"{self.arch} is an adapted model: its nodes are its conv outputs (residual='conv'); "
                             f"residual={residual!r} needs the zoo's ResNets, whose blocks are known")
        return self._nodes

    def feature_nodes(self, residual: str = DEFAULT_RESIDUAL) -> tuple[str, ...]:
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
