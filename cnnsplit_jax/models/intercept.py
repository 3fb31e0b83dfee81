"""Intercepting a user's Flax model (Linen or NNX): every conv, normalisation and dense call
in call order (``discover``), and the hooks the adapter runs its masks through.

Linen: ``nn.intercept_methods``. NNX: the layer's class is swapped for a subclass that
reports its call, for the duration of one call only (the graphdef is unchanged).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from .base import ConvBN, Dense

__all__ = ["AdapterError", "LayerCall", "discover", "intercept_nnx", "linen_interceptor"]

_LINEN = ((nn.Conv, "conv"), ((nn.BatchNorm, nn.GroupNorm, nn.LayerNorm), "norm"), (nn.Dense, "dense"))
#: the zoo's own layers are intercepted as the user's are: ``ConvBN`` is a conv with its
#: BatchNorm fused in (its output is the place a mask point gates), ``Dense`` a dense layer
_NNX = (((nnx.Conv, ConvBN), "conv"), ((nnx.BatchNorm, nnx.GroupNorm, nnx.LayerNorm), "norm"),
        ((nnx.Linear, Dense), "dense"))


def _kind(layer, table) -> str | None:
    for cls, kind in table:
        if isinstance(layer, cls):
            return kind
    return None


class AdapterError(ValueError):
    """A model that cannot be adapted as given (the message says what to declare)."""


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One intercepted call: ``path`` of the layer, ``kind`` (``"conv"`` / ``"norm"``), the
    output shape, the kernel's (k_h, k_w) and stride for convs, whether its input was the
    previous call's output (a norm reading its conv directly), the layer's class name and its
    ``feature_group_count`` (1 unless a grouped conv)."""

    path: str
    kind: str
    out_shape: tuple[int, ...]
    ksize: int = 0
    stride: int = 1
    reads_previous: bool = False
    layer_class: str = ""
    groups: int = 1


# ------------------------------------------------------------------------ interception
_NNX_HOOK: dict[str, Callable] = {}
_NNX_CLASSES: dict[type, type] = {}


def _hooked(cls: type) -> type:
    if cls not in _NNX_CLASSES:
        def __call__(self, x, *args, **kwargs):
            hook = _NNX_HOOK.get("fn")
            call = lambda v: cls.__call__(self, v, *args, **kwargs)  # noqa: E731
            return call(x) if hook is None else hook(self, x, call)

        _NNX_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _NNX_CLASSES[cls]


def _nnx_layers(model) -> dict[int, tuple[str, str, Any]]:
    out = {}
    for path, m in nnx.iter_modules(model):
        kind = _kind(m, _NNX)
        if kind:
            out[id(m)] = ("/".join(map(str, path)), kind, m)
    return out


def _after(fn):
    """An ``around`` hook from ``fn(path, kind, layer, x, out)`` (run the layer, then fn)."""
    return lambda path, kind, layer, x, call: fn(path, kind, layer, x, call(x))


@contextlib.contextmanager
def intercept_nnx(model, fn, *, around: bool = False):
    """Within the block, every conv / norm / dense call of NNX ``model`` returns
    ``fn(path, kind, layer, x, out)``, or with ``around`` ``fn(path, kind, layer, x, call)``
    (``call(x)`` runs the layer: the hook may run it on another input, or not at all)."""
    layers = _nnx_layers(model)
    hook = fn if around else _after(fn)
    swapped = []
    try:
        for path, kind, m in layers.values():
            swapped.append((m, m.__class__))
            object.__setattr__(m, "__class__", _hooked(type(m)))
        _NNX_HOOK["fn"] = lambda m, x, call: hook(*layers[id(m)][:2], m, x, call)
        yield
    finally:
        _NNX_HOOK.pop("fn", None)
        for m, cls in swapped:
            object.__setattr__(m, "__class__", cls)


def linen_interceptor(fn, *, around: bool = False):
    """A ``nn.intercept_methods`` interceptor calling ``fn`` as ``intercept_nnx`` does."""
    hook = fn if around else _after(fn)

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        kind = _kind(m, _LINEN) if context.method_name == "__call__" else None
        if kind is None:
            return next_fun(*args, **kwargs)
        call = lambda v: next_fun(v, *args[1:], **kwargs)  # noqa: E731
        return hook("/".join(map(str, m.scope.path)), kind, m, args[0], call)

    return interceptor


def _stride(layer) -> int:
    s = getattr(layer, "strides", getattr(layer, "stride", None))
    if s is None:
        return 1
    s = (s,) if isinstance(s, int) else tuple(s)
    return int(s[0])


def _ksize(layer) -> int:
    k = getattr(layer, "kernel_size", None) or tuple(layer.kernel.shape[:2])  # the zoo's ConvBN: HWIO kernel
    k = (k,) if isinstance(k, int) else tuple(k)
    return int(k[0])


def discover(net, variables=None, *, input_shape: Sequence[int], apply_kwargs: Mapping | None = None):
    """(``LayerCall`` list in call order, logits shape, path of the dense layer whose output
    is the logits or None) of one forward pass on zeros ``[1, *input_shape]``."""
    calls: list[LayerCall] = []
    last = {"out": None}

    def fn(path, kind, layer, x, out):
        calls.append(LayerCall(path, kind, tuple(out.shape[1:]), _ksize(layer) if kind == "conv" else 0,
                               _stride(layer) if kind == "conv" else 1, x is last["out"], type(layer).__name__,
                               int(getattr(layer, "feature_group_count", 1) or 1)))
        last["out"] = out
        return out

    x = jnp.zeros((1, *input_shape), jnp.float32)
    kw = dict(apply_kwargs or {})
    try:
        if isinstance(net, nnx.Module):
            with intercept_nnx(net, fn):
                y = net(x, **kw)
        else:
            with nn.intercept_methods(linen_interceptor(fn)):
                y = net.apply(variables, x, **kw)
    except Exception as e:  # a shape error of the user's model, reported with the shape tried
        raise AdapterError(f"running the model on an input of shape [1, {', '.join(map(str, input_shape))}] "
                           f"failed: {type(e).__name__}: {e}") from e
    head = calls[-1].path if calls and calls[-1].kind == "dense" and y is last["out"] else None
    return calls, tuple(y.shape), head
