"""Residual ties discovered from the traced graph: which mask points are added (or otherwise
combined channel by channel) to each other, so that they must share one mask for a module to
be physically smaller (a residual block's last conv and its shortcut, identity or projected).

``trace_channels`` traces the model (with one mask ``[C]`` per point, one probe ``[C_in]``
multiplied into each conv's and dense layer's input, and the image) to a jaxpr and follows, for every value, the set of mask points
whose channels lie along its last axis (its *provenance*):

* a mask starts the provenance of its point (``out * mask``), the image its own;
* ops that keep the last axis (elementwise ops, activations, pooling windows of one channel,
  reductions over other axes, broadcasts, reshapes and slices that keep it, and flattening
  the trailing axes position-major) keep it;
* convolutions, matrix products and concatenations along channels start anew (their output
  channels are new kernels);
* an elementwise op with two or more operands of non-empty provenance (``add`` of a residual
  sum, ``max``, ``mul``, ``select_n`` ...) ties all their points together.

A probe takes the provenance of the input it multiplies: which point's kept channels a layer
reads (``modules.extract_adapted`` slices its kernel's input channels by them).

Nested jaxprs (``jit``, ``custom_jvp_call`` of ``relu``, ``remat``, ``custom_vjp_call``) are
followed; control flow (``cond``, ``scan``, ``while``) and unknown primitives start anew, which
can only miss a tie (every point keeps its own mask: the masked forward stays exact), never
invent one.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

__all__ = ["trace_channels", "relu_inputs", "IMAGE"]

#: ops that combine operands channel by channel: two operands with provenance are tied
_COMBINE = {"add", "sub", "add_any", "mul", "div", "max", "min", "select_n", "clamp", "pow", "atan2", "rem"}
#: ops whose first operand keeps its last axis when the output's last axis has its size
_KEEP_IF_LAST = {"reshape", "slice", "pad", "dynamic_slice", "rev", "squeeze", "copy", "copy_p",
                 "convert_element_type", "reduce_precision", "cumsum", "cummax", "cummin", "cumprod"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
_WINDOW = {"reduce_window_max", "reduce_window_min", "reduce_window_sum", "reduce_window"}


class _Union:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def join(self, names) -> None:
        names = list(names)
        for b in names[1:]:
            self.parent[self.find(b)] = self.find(names[0])


def _shape(v) -> tuple:
    return tuple(getattr(v.aval, "shape", ()))


def _sub_jaxpr(eqn):
    """The nested jaxpr of a call-like equation whose inputs are the equation's, else None."""
    for v in eqn.params.values():
        j = v.jaxpr if isinstance(v, jcore.ClosedJaxpr) else v
        if isinstance(j, jcore.Jaxpr) and len(j.invars) == len(eqn.invars):
            return j
    return None


def _keeps_last(eqn, src, out) -> bool:
    """Whether ``out`` carries the channels of ``src`` (its last axis) along its last axis."""
    p, name = eqn.params, eqn.primitive.name
    si, so = _shape(src), _shape(out)
    if name == "reshape" and si and so and any(math.prod(si[k:]) == so[-1] for k in range(len(si) - 1)):
        return True  # trailing axes flattened, position-major: every entry is still one channel's
    if not si or not so or si[-1] != so[-1]:
        return False
    if name == "broadcast_in_dim":
        return p["broadcast_dimensions"][-1] == len(so) - 1
    if name == "transpose":
        return p["permutation"][-1] == len(si) - 1
    if name in _REDUCE:
        return len(si) - 1 not in tuple(p.get("axes", ()))
    if name in _WINDOW:
        return tuple(p["window_dimensions"])[-1] == 1
    if name == "concatenate":
        return p["dimension"] != len(si) - 1
    return name in _KEEP_IF_LAST or name in _COMBINE or len([v for v in eqn.invars if _shape(v)]) == 1


def _walk(jaxpr, provs: list[frozenset], ties: _Union) -> list[frozenset]:
    env: dict = {}
    for v, p in zip(jaxpr.invars, provs):
        env[v] = p
    read = lambda v: frozenset() if isinstance(v, jcore.Literal) else env.get(v, frozenset())  # noqa: E731
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            outs = _walk(sub, ins, ties)
        else:
            name = eqn.primitive.name
            if name in _COMBINE or (name == "concatenate" and eqn.params["dimension"] != len(_shape(eqn.invars[0])) - 1):
                carried = [p for v, p in zip(eqn.invars, ins) if p and _keeps_last(eqn, v, eqn.outvars[0])]
                if len(carried) > 1:
                    ties.join(sorted(set().union(*carried)))
            outs = []
            for out in eqn.outvars:
                keep = [p for v, p in zip(eqn.invars, ins) if p and _keeps_last(eqn, v, out)]
                outs.append(frozenset().union(*keep) if keep else frozenset())
        for v, p in zip(eqn.outvars, outs):
            env[v] = p
    return [read(v) for v in jaxpr.outvars]


IMAGE = "<image>"  # the token of the model's input channels
_READ = "<reads>"  # prefix of the token of a layer's input


def trace_channels(forward: Callable, sizes: Mapping[str, int], readers: Mapping[str, int],
                   image_shape, order: list[str] | None = None) -> tuple[list[tuple[str, ...]], dict]:
    """Ties and inputs of a model, from one trace of ``forward(masks, probes, x)``.

    Args:
      forward: the model on images ``x`` ``[1, *image_shape]`` with each mask ``{point:
        float [C]}`` multiplied into its point's output and each probe ``{layer: float
        [C_in]}`` into that layer's input.
      sizes: ``{point: C}``; readers: ``{layer path: C_in}`` (convs and dense layers).
      order: the points' order (default: ``sizes``').

    Returns:
      ``(ties, reads)``: groups (two or more points, in ``order``) whose channels are combined
      elementwise -- a residual sum's inputs; and ``{layer: frozenset}`` of the points (and
      ``IMAGE``) whose channels lie along each layer's input's last axis (empty: unknown, e.g.
      a concatenation of several groups).
    """
    names = list(sizes)
    tree = {"m": {n: jnp.ones((int(sizes[n]),), jnp.float32) for n in names},
            "p": {r: jnp.ones((int(c),), jnp.float32) for r, c in readers.items()},
            "x": jnp.zeros((1, *image_shape), jnp.float32)}
    closed = jax.make_jaxpr(lambda t: forward(t["m"], t["p"], t["x"]))(tree)
    tokens = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:  # the jaxpr's input order
        part, key = path[0].key, path[1].key if len(path) > 1 else None
        tokens.append(IMAGE if part == "x" else key if part == "m" else f"{_READ}{key}")
    uf = _Union()
    _walk(closed.jaxpr, [frozenset({t}) for t in tokens], uf)
    members: dict[str, set] = {}
    for t in tokens:
        if not t.startswith(_READ):
            members.setdefault(uf.find(t), set()).add(t)
    rank = {n: i for i, n in enumerate(order or names)}
    ties = sorted((tuple(sorted(g - {IMAGE}, key=rank.__getitem__)) for g in members.values() if len(g - {IMAGE}) > 1),
                  key=lambda g: rank[g[0]])
    reads = {r: frozenset(members.get(uf.find(f"{_READ}{r}"), ())) for r in readers}
    return ties, reads


# ------------------------------------------------------------------ what a node feeds
_PASS = {"convert_element_type", "reshape", "copy", "copy_p", "squeeze", "expand_dims"}


def _inlined(jaxpr) -> tuple[list, dict]:
    """The equations of ``jaxpr`` with nested call-like jaxprs inlined (``(primitive name,
    inputs, outputs)``, variables resolved through the calls), and the alias map used."""
    alias: dict = {}

    def resolve(v):
        while not isinstance(v, jcore.Literal) and v in alias:
            v = alias[v]
        return v

    out = []

    def walk(j):
        for eqn in j.eqns:
            sub = _sub_jaxpr(eqn)
            if sub is None:
                out.append((eqn.primitive.name, [resolve(v) for v in eqn.invars], list(eqn.outvars)))
                continue
            for sv, v in zip(sub.invars, eqn.invars):
                alias[sv] = resolve(v)
            walk(sub)
            for ov, sv in zip(eqn.outvars, sub.outvars):
                alias[ov] = resolve(sv)

    walk(jaxpr)
    return out, alias


def _is_zero(v) -> bool:
    return isinstance(v, jcore.Literal) and not getattr(v.aval, "shape", ()) and float(v.val) == 0.0


def relu_inputs(forward: Callable, shapes: Mapping[str, tuple], image_shape) -> dict[str, bool]:
    """Whether each node is a ReLU's input, from one trace of ``forward(keeps, x)`` (a model
    on images ``[1, *image_shape]`` with each node's values multiplied by ``keeps[node]``).

    A node is one when everything that reads its values is ``max(v, 0)`` (a ReLU, possibly
    after dtype casts and reshapes), or an ``add`` whose sum only a ReLU reads (a
    post-activation residual block's second conv, masked before the Add as the paper maps
    it). Anything else (a norm, a pre-activation block's Add that a BatchNorm reads, another
    activation) makes it not one.
    """
    names = list(shapes)
    tree = {"k": {n: jnp.ones(tuple(shapes[n]), jnp.float32) for n in names},
            "x": jnp.zeros((1, *image_shape), jnp.float32)}
    closed = jax.make_jaxpr(lambda t: forward(t["k"], t["x"]))(tree)
    eqns, _ = _inlined(closed.jaxpr)
    readers: dict = {}
    for e in eqns:
        for v in e[1]:
            if not isinstance(v, jcore.Literal):
                readers.setdefault(v, []).append(e)

    def reached(v) -> list:
        """The equations reading v, through dtype casts and reshapes."""
        got = []
        for e in readers.get(v, []):
            got += reached(e[2][0]) if e[0] in _PASS else [e]
        return got

    def relu(e) -> bool:
        return e[0] == "max" and any(_is_zero(v) for v in e[1])

    out = {}
    for (path, _), var in zip(jax.tree_util.tree_flatten_with_path(tree)[0], closed.jaxpr.invars):
        if path[0].key == "x":
            continue
        name = path[1].key
        front, products = [var], []
        while front:  # the keep map through its broadcast to its product with the node's values
            v = front.pop()
            for e in readers.get(v, []):
                if e[0] == "mul":
                    products.extend(e[2])
                elif e[0] in _PASS or e[0] == "broadcast_in_dim":
                    front.extend(e[2])
        users = [e for v in products for e in reached(v)]
        out[name] = bool(users) and all(relu(e) or (e[0] == "add" and reached(e[2][0]) and
                                                    all(relu(r) for r in reached(e[2][0]))) for e in users)
    return out
