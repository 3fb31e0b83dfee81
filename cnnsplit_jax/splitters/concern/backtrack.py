"""Backtracking (Pan & Rajan's concern modularization): MC-BLN and MC-BI over ResNet nodes.

* **MC-BLN** (``backtrack_bln`` + ``apply_feature_removal``): pooled features that serve only
  the channeled unconcerned output are removed; through the global average pool one feature
  is every position of its channel in the nodes the pool reads (``ResNet.feature_nodes``:
  the last Add, or the branch nodes it merges), and its row of the channeled head is zeroed.
* **MC-BI** (``backtrack_input``), walking from the output to the input, two rules:

  - ``"listing"`` (the paper's Algorithm 3, ``backtrack="bi"``): per conv layer, an input
    position that feeds at least one output position *of this conv* is deactivated when every
    output position of this conv that it feeds (through the sliding windows, SAME padding,
    strides; padding feeds nothing) is deactivated, in every output channel. Other consumers
    of the same tensor (an identity shortcut) are not consulted, and each conv adds on its own
    (a tensor read by two convs gets the union). When
    the tensor is an Add's output, the maps of both of the Add's inputs are updated (line 31);
    under the ``"conv"`` mapping an identity input has no map, so only conv2's is.
    This changes what a module computes wherever a shortcut still carried the value.
  - ``"preserving"`` (``backtrack="bi_preserving"``): a position is deactivated only when
    *every* consumer, identity shortcut and projection included, no longer reads it, so its
    value cannot reach the output (an identity shortcut without a node always reads). It never
    changes what a module computes (a deactivated position is multiplied by 0, so its inputs
    do not matter); it only makes the maps larger.

Both edit ``{node: bool [N, H, W, C]}`` deactivation maps (True = deactivated) of N modules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ...models.protocol import DECLARED_GRAPH, require
from .config import BLN_RULES

__all__ = ["backtrack_bln", "apply_feature_removal", "backtrack_input", "window_reach", "BI_RULES"]


def backtrack_bln(head_w: np.ndarray, delta: float = 0.5, rule: str = "listing") -> np.ndarray:
    """bool [N, F]: the pooled features MC-BLN removes, from the channeled head ``head_w``
    [N, F, 2] (column 0: the concerned output V_c, column 1: the unconcerned V_uc).

    rule ``"listing"`` (the default): the camera-ready paper's Algorithm 2, line 5, as printed:
    feature i is removed when ``W[i, V_uc] <= -delta and W[i, V_c] >= +delta``. The prose
    describes the intent otherwise ("nodes that only participate in identifying the
    unconcerned classes"); the other rules are readings of that prose, where a feature is
    removed when its edge to V_uc is strong and its edge to V_c is not:
    ``"absolute"``: an edge is strong when ``w > delta``; ``"negative"``: when ``w < -delta``;
    ``"relative"``: when ``|w| >= delta * max |w|`` over its output column (either sign).
    """
    w = np.asarray(head_w)  # [N, F, 2]
    if rule == "listing":
        return (w[..., 1] <= -delta) & (w[..., 0] >= delta)
    if rule == "relative":
        a = np.abs(w)
        strong = a >= delta * a.max(axis=1, keepdims=True)
    elif rule == "absolute":
        strong = w > delta
    elif rule == "negative":
        strong = w < -delta
    else:
        raise ValueError(f"rule must be one of {BLN_RULES}, got {rule!r}")
    return strong[..., 1] & ~strong[..., 0]


def apply_feature_removal(model, inactive: dict, removed: np.ndarray, residual: str) -> dict:
    """Deactivate every position of each removed pooled feature (removed: bool [N, F]) in the
    nodes the global pool reads; returns a new map dict."""
    out = dict(inactive)
    removed = np.asarray(removed, bool)
    for name in model.feature_nodes(residual):
        n, h, w, c = out[name].shape
        out[name] = out[name] | np.broadcast_to(removed[:, None, None, :], (n, h, w, c))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _reach(alive_out, in_hw, k, stride):
    x = jnp.zeros((alive_out.shape[0], *in_hw, 1), jnp.float32)
    conv = lambda v: jax.lax.conv_general_dilated(  # noqa: E731  (the model's SAME padding)
        v, jnp.ones((k, k, 1, 1), jnp.float32), (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, vjp = jax.vjp(conv, x)
    return vjp(alive_out[..., None].astype(jnp.float32))[0][..., 0] > 0


def window_reach(alive_out: np.ndarray, in_hw: tuple[int, int], k: int, stride: int) -> np.ndarray:
    """bool [N, H, W]: input positions that feed at least one alive output position of a
    k x k SAME convolution with ``stride`` (alive_out: bool [N, Ho, Wo])."""
    return np.asarray(_reach(jnp.asarray(alive_out), tuple(in_hw), int(k), int(stride)))


def _tensors(model, residual: str):
    """Post-activation tensors in forward order: (own maps, consumers); a consumer is
    (kind, out_map, k, stride) with kind "conv" (all channels read) or "elementwise" (an
    identity shortcut; out_map None when the mapping gives it no node: it always reads)."""
    names = {nd.name for nd in model.nodes(residual)}
    blocks = [(f"s{s}b{b}", 2 if s > 0 and b == 0 else 1) for s in range(3) for b in range(model.blocks)]
    if residual == "sum":  # a block's output is its Add's node
        out_of = own_of = lambda p: (f"{p}_add",)  # noqa: E731
    else:  # the branch nodes the Add merges: conv2's, and the shortcut's where it has one
        out_of = lambda p: (f"{p}_conv2",)  # noqa: E731
        own_of = lambda p: tuple(n for n in (f"{p}_conv2", f"{p}_short") if n in names)  # noqa: E731
    short_of = lambda p: next((n for n in (f"{p}_add", f"{p}_short") if n in names), None)  # noqa: E731
    tensors, own = [], ("conv_0",)
    for p, stride in blocks:  # the tensor `own` feeds block p
        short = ("conv", short_of(p), 1, 2) if stride > 1 else ("elementwise", short_of(p), 1, 1)
        tensors.append((own, [("conv", f"{p}_conv1", 3, stride), short]))
        tensors.append(((f"{p}_conv1",), [("conv", out_of(p)[0], 3, 1)]))
        own = own_of(p)
    return tensors  # the last block's output feeds the pool: nothing to backtrack into


BI_RULES = ("listing", "preserving")


def backtrack_input(model, inactive: dict, residual: str, rule: str = "listing") -> dict:
    """MC-BI: extend the deactivation maps ``{node: bool [N, H, W, C]}`` backward from the
    output by ``rule`` (``"listing"``: Algorithm 3; ``"preserving"``: output-preserving; see
    the module docstring); returns a new map dict (a superset of ``inactive``)."""
    require(model, DECLARED_GRAPH, "MC-BI (backtrack='bi')",
            "it walks the zoo's ResNet graph; use backtrack='bln' or 'none'")
    if rule not in BI_RULES:
        raise ValueError(f"rule must be one of {BI_RULES}, got {rule!r}")
    out = {k: np.asarray(v, bool).copy() for k, v in inactive.items()}
    for own, consumers in reversed(_tensors(model, residual)):
        n, h, w, c = out[own[0]].shape
        if rule == "listing":  # each conv on its own, the shortcut not consulted
            dead = np.zeros((n, h, w, 1), bool)
            for kind, name, k, stride in consumers:
                if kind == "conv":
                    # this conv's inputs that feed only its deactivated outputs; a position it
                    # never reads (a stride-2 1x1 projection's odd rows) is not its to add
                    alive = ~out[name].all(-1)
                    fed = window_reach(np.ones_like(alive), (h, w), k, stride)
                    dead |= (fed & ~window_reach(alive, (h, w), k, stride))[..., None]
        else:  # every consumer must have stopped reading the position
            dead = np.ones((n, h, w, c), bool)
            for kind, name, k, stride in consumers:
                if kind == "elementwise":
                    dead &= out[name] if name is not None else False
                else:
                    dead &= ~window_reach(~out[name].all(-1), (h, w), k, stride)[..., None]
        for name in own:
            out[name] |= np.broadcast_to(dead, (n, h, w, c))
    return out
