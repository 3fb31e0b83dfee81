"""Bring your own model: a user's Flax CNN (NNX or Linen, any input size) seen through mask
points, so that the kernel-mask splitters and composition run on it unchanged.

``adapt(model, variables=None, *, input_shape, ...)`` runs the model once on zeros and
records, in call order, every conv call and every normalisation call (``Conv``,
``BatchNorm``, ``GroupNorm``, ``LayerNorm`` of Linen or NNX) by intercepting them (Linen:
``nn.intercept_methods``; NNX: the layer's class is swapped for a subclass that reports its
call, for the duration of the call only). Each conv gets a *mask point* of its output
channels, placed where masking a channel equals dropping that kernel:

* after the normalisation that reads the conv's output directly (``norm(conv(x))``), else
  at the conv's output;
* before the activation: for ReLU-like activations (``f(0) = 0``, positively homogeneous)
  ``f(m * y) = m * f(y)`` for m in {0, 1}, so a binary mask gates the activated output.

The result, ``AdaptedCNN``, is an ``nnx.Module`` with the zoo's interface for kernel masks
(``mask_points()``, ``topology``, ``__call__(x, masks)``, ``features`` ...): masks are
``{point: float [C]}``; a point name is the conv's path (``"Conv_0"``, ``"layer1/0/conv1"``).
``ties`` merges points that must share one mask (a residual block's conv and the conv whose
output its shortcut adds); otherwise every conv has its own point, which is exact for the
masked forward. Kernels are counted per gated conv as for the zoo.

``load_variables`` restores a user's parameters from a Flax msgpack file or an Orbax
checkpoint directory, given the model definition.

Not (yet) available for adapted models, with a clear error: physical extraction (modules keep
the masked form and say so), concern identification (position nodes), saving a module set
with the model definition (save the masks; rebuild with ``adapt``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from .base import ConvSpec, MaskPoint

__all__ = ["adapt", "AdaptedCNN", "AdapterError", "LayerCall", "discover", "load_variables"]

_LINEN_CONVS = (nn.Conv,)
_LINEN_NORMS = (nn.BatchNorm, nn.GroupNorm, nn.LayerNorm)
_NNX_CONVS = (nnx.Conv,)
_NNX_NORMS = (nnx.BatchNorm, nnx.GroupNorm, nnx.LayerNorm)


class AdapterError(ValueError):
    """A model that cannot be adapted as given (the message says what to declare)."""


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One intercepted call: ``path`` of the layer, ``kind`` (``"conv"`` / ``"norm"``), the
    output shape, the kernel's (k_h, k_w) and stride for convs, and whether its input was the
    previous call's output (a norm reading its conv directly)."""

    path: str
    kind: str
    out_shape: tuple[int, ...]
    ksize: int = 0
    stride: int = 1
    reads_previous: bool = False


# ------------------------------------------------------------------------ interception
_NNX_HOOK: dict[str, Callable] = {}
_NNX_CLASSES: dict[type, type] = {}


def _hooked(cls: type) -> type:
    if cls not in _NNX_CLASSES:
        def __call__(self, x, *args, **kwargs):
            out = cls.__call__(self, x, *args, **kwargs)
            hook = _NNX_HOOK.get("fn")
            return out if hook is None else hook(self, x, out)

        _NNX_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _NNX_CLASSES[cls]


def _nnx_layers(model) -> dict[int, tuple[str, str, Any]]:
    out = {}
    for path, m in nnx.iter_modules(model):
        kind = "conv" if isinstance(m, _NNX_CONVS) else "norm" if isinstance(m, _NNX_NORMS) else None
        if kind:
            out[id(m)] = ("/".join(map(str, path)), kind, m)
    return out


@contextlib.contextmanager
def _intercept_nnx(model, fn):
    """Within the block, every conv / norm call of NNX ``model`` returns
    ``fn(path, kind, layer, x, out)``."""
    layers = _nnx_layers(model)
    swapped = []
    try:
        for path, kind, m in layers.values():
            swapped.append((m, m.__class__))
            object.__setattr__(m, "__class__", _hooked(type(m)))
        _NNX_HOOK["fn"] = lambda m, x, out: fn(*layers[id(m)][:2], m, x, out)
        yield
    finally:
        _NNX_HOOK.pop("fn", None)
        for m, cls in swapped:
            object.__setattr__(m, "__class__", cls)


def _linen_interceptor(fn):
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if context.method_name != "__call__":
            return out
        kind = "conv" if isinstance(m, _LINEN_CONVS) else "norm" if isinstance(m, _LINEN_NORMS) else None
        if kind is None:
            return out
        return fn("/".join(map(str, m.scope.path)), kind, m, args[0], out)

    return interceptor


def _stride(layer) -> int:
    s = getattr(layer, "strides", None)
    if s is None:
        return 1
    s = (s,) if isinstance(s, int) else tuple(s)
    return int(s[0])


def _ksize(layer) -> int:
    k = getattr(layer, "kernel_size")
    k = (k,) if isinstance(k, int) else tuple(k)
    return int(k[0])


# ---------------------------------------------------------------------------- the model
class AdaptedCNN(nnx.Module):
    """A user's Flax CNN with kernel masks (see the module docstring).

    Attributes: ``arch`` (``"adapted:<class name>"``), ``num_classes``, ``in_channels``,
    ``input_shape`` (H, W, C), ``calls`` (the ``LayerCall``s discovered), ``topology`` (one
    ``ConvSpec`` per conv: path, kernel size, channels, its mask point; ``inputs`` are not
    known, so extraction is refused), ``fc_in`` (the width of the logits' input is unknown:
    0).
    """

    mask_kind = "kernel"
    extractable = False
    batch_norm = False
    width = 1.0
    fc_layers: tuple[str, ...] = ()

    def __init__(self, net, variables, *, input_shape, num_classes, points, calls, apply_kwargs, name):
        self.net = net if isinstance(net, nnx.Module) else nnx.static(net)
        self.linen = not isinstance(net, nnx.Module)
        self.variables = nnx.data(_wrap(variables)) if self.linen else None
        self.apply_kwargs = nnx.static(dict(apply_kwargs))
        self.input_shape = tuple(int(v) for v in input_shape)
        self.in_channels = self.input_shape[-1]
        self.num_classes = int(num_classes)
        self.arch = f"adapted:{name}"
        self.calls = tuple(calls)
        self._points = tuple(points)  # MaskPoint(name, size, conv paths)
        self._where = {}  # layer path -> point name, for the layer whose output is masked
        by_path = {c.path: c for c in self.calls}
        order = [c.path for c in self.calls]
        for p in self._points:
            for conv in p.layers:
                i = order.index(conv)
                nxt = self.calls[i + 1] if i + 1 < len(self.calls) else None
                at = nxt.path if nxt is not None and nxt.kind == "norm" and nxt.reads_previous else conv
                self._where[at] = p.name
        self.topology = tuple(ConvSpec(c, by_path[c].ksize, p.size, (), p.name, self.input_shape[0],
                                       by_path[c].stride) for p in self._points for c in p.layers)
        self.fc_in = 0

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

    def check_named(self, given, shapes, key, entry) -> None:
        if given is None:
            return
        unknown = set(given) - set(shapes)
        if unknown:
            raise ValueError(f"unknown {key}(s) {sorted(unknown)} for {self.arch}; expected {list(shapes)}")
        for k, v in given.items():
            if tuple(v.shape) != tuple(shapes[k]):
                raise ValueError(f"{entry} {k!r} of {self.arch} must have shape {tuple(shapes[k])}, got {tuple(v.shape)}")

    def _run(self, x, fn):
        if self.linen:
            variables = jax.tree.map(lambda v: v[...], self.variables, is_leaf=lambda v: isinstance(v, nnx.Variable))
            with nn.intercept_methods(_linen_interceptor(fn)):
                return self.net.apply(variables, x, **self.apply_kwargs)
        with _intercept_nnx(self.net, fn):
            return self.net(x, **self.apply_kwargs)

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
def discover(net, variables=None, *, input_shape: Sequence[int], apply_kwargs: Mapping | None = None):
    """(``LayerCall`` list in call order, logits shape) of one forward pass on zeros
    ``[1, *input_shape]``."""
    calls: list[LayerCall] = []
    last = {"out": None}

    def fn(path, kind, layer, x, out):
        calls.append(LayerCall(path, kind, tuple(out.shape[1:]), _ksize(layer) if kind == "conv" else 0,
                               _stride(layer) if kind == "conv" else 1, x is last["out"]))
        last["out"] = out
        return out

    x = jnp.zeros((1, *input_shape), jnp.float32)
    kw = dict(apply_kwargs or {})
    try:
        if isinstance(net, nnx.Module):
            with _intercept_nnx(net, fn):
                y = net(x, **kw)
        else:
            with nn.intercept_methods(_linen_interceptor(fn)):
                y = net.apply(variables, x, **kw)
    except Exception as e:  # a shape error of the user's model, reported with the shape tried
        raise AdapterError(f"running the model on an input of shape [1, {', '.join(map(str, input_shape))}] "
                           f"failed: {type(e).__name__}: {e}") from e
    return calls, tuple(y.shape)


def adapt(
    net,
    variables: Mapping | None = None,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    mask_points: Sequence[str] | None = None,
    ties: Sequence[Sequence[str]] = (),
    apply_kwargs: Mapping | None = None,
    name: str | None = None,
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
      ties: groups of conv paths sharing one mask point (named after the first).
      name: shown in ``arch`` (default: the class name).

    Raises:
      AdapterError: no conv layer, a declared path that is not a conv, tied convs of different
        widths, logits that are not [1, K] or disagree with ``num_classes``, or a forward
        pass that fails on ``input_shape``.
    """
    if isinstance(net, nnx.Module) == (variables is not None):
        raise AdapterError("pass an NNX module alone, or a Linen module with its variables")
    if len(tuple(input_shape)) != 3:
        raise AdapterError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
    calls, out = discover(net, variables, input_shape=input_shape, apply_kwargs=apply_kwargs)
    convs = {c.path: c for c in calls if c.kind == "conv"}
    if not convs:
        raise AdapterError(f"{type(net).__name__} has no conv layer that could be intercepted (flax Conv); "
                           "the kernel-mask methods need at least one")
    if len(out) != 2:
        raise AdapterError(f"the model's output must be logits [B, K]; got shape {out}")
    if num_classes is not None and out[1] != num_classes:
        raise AdapterError(f"num_classes={num_classes} but the model's logits have {out[1]} columns")
    if len({c.path for c in calls}) != len(calls):
        raise AdapterError("a conv or norm layer is called more than once per forward pass (weight sharing); "
                           "declare mask_points explicitly for layers called once")
    chosen = list(convs) if mask_points is None else list(mask_points)
    unknown = [p for p in chosen + [q for g in ties for q in g] if p not in convs]
    if unknown:
        raise AdapterError(f"no conv layer at path(s) {unknown}; the convs found are {list(convs)}")
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
    return AdaptedCNN(net, variables, input_shape=input_shape, num_classes=out[1], points=points, calls=calls,
                      apply_kwargs=apply_kwargs or {}, name=name or type(net).__name__)


# ------------------------------------------------------------------------------ loading
def _pure(tree):
    return jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, tree,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def load_variables(path, like):
    """A user's trained parameters, from a Flax msgpack file (``flax.serialization.to_bytes``
    of the variables, or of ``nnx.state(model)``'s pure dict) or an Orbax checkpoint directory
    (a pytree saved with ``orbax.checkpoint``), checked against ``like``.

    Args:
      path: a file (msgpack) or a directory (Orbax).
      like: Linen variables of the right structure (e.g. ``module.init(...)``), or an NNX
        module, which is updated in place.

    Returns:
      the restored Linen variables, or the updated NNX module.

    Raises:
      AdapterError: no such file or directory, unreadable data, or a tree whose structure or
        shapes differ from ``like``'s.
    """
    import os

    import orbax.checkpoint as ocp
    from flax import serialization

    path = os.fspath(path)
    target = nnx.state(like).to_pure_dict() if isinstance(like, nnx.Module) else _pure(like)
    try:
        if os.path.isdir(path):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = ocp.v1.load(path)
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                got = serialization.msgpack_restore(f.read())
        else:
            raise AdapterError(f"no checkpoint at {path} (a msgpack file or an Orbax directory)")
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"cannot read a checkpoint at {path}: {type(e).__name__}: {e}") from e
    got = jax.tree.map(jnp.asarray, got)
    want_t, got_t = jax.tree.structure(serialization.to_state_dict(target)), jax.tree.structure(got)
    if want_t != got_t:
        raise AdapterError(f"the checkpoint at {path} does not have the model's structure: expected {want_t}, "
                           f"found {got_t}")
    bad = [f"{jax.tree_util.keystr(k)}: {a.shape} vs {b.shape}"
           for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(serialization.to_state_dict(target)),
                                jax.tree.leaves(got)) if a.shape != b.shape]
    if bad:
        raise AdapterError(f"the checkpoint at {path} has other shapes than the model: {bad[:5]}")
    restored = serialization.from_state_dict(target, got)
    if isinstance(like, nnx.Module):
        state = nnx.state(like)
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(like, state)
        return like
    return restored
