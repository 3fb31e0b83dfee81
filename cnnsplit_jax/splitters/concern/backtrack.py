"""Backtracking (Pan & Rajan's concern modularization): MC-BLN and MC-BI over ResNet nodes.

* **MC-BLN** (``backtrack_bln`` + ``apply_feature_removal``): pooled features that serve only
  the channeled unconcerned output are removed; through the global average pool one feature
  is every position of its channel in the nodes the pool reads (``ResNet.feature_nodes``:
  the last Add, or both branches merged by it under the paper's ``"conv"`` mapping).
* **MC-BI** (``backtrack_input``): walking from the output to the input, a position of a
  layer's output is deactivated when every position it feeds is already deactivated: its
  value can no longer reach the output. Feeding follows the sliding windows (SAME padding,
  strides; padding positions feed nothing), the identity shortcut (position to position) and
  the 1x1 stride-2 projection. A conv consumer reads all input channels, so a spatial
  position is dead for it only when every output channel of every window covering it is.

Both edit ``{node: bool [N, H, W, C]}`` deactivation maps (True = deactivated) of N modules.
MC-BI never changes what a module computes (a deactivated position is multiplied by 0, so
its inputs do not matter); it only makes the maps larger.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ...models.protocol import DECLARED_GRAPH, require
from .config import BLN_RULES

__all__ = ["backtrack_bln", "apply_feature_removal", "backtrack_input", "window_reach"]


def backtrack_bln(head_w: np.ndarray, delta: float = 0.5, rule: str = "absolute") -> np.ndarray:
    """bool [N, F]: pooled features that serve only the unconcerned output (MC-BLN): a feature
    is removed when its edge to the unconcerned output is strong and its edge to the concerned
    output is not.

    rule ``"absolute"``: an edge is strong when ``w > delta`` (signed: a strongly *negative*
    unconcerned edge, evidence for the class, never removes a feature); ``"negative"``: when
    ``w < -delta``; ``"relative"``: when ``|w| >= delta * max |w|`` over its output column
    (either sign).
    """
    w = np.asarray(head_w)  # [N, F, 2]
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
    (kind, out_map, k, stride) with kind "conv" (all channels read) or "elementwise"."""
    sum_mode = residual == "sum"
    out_of = lambda p: f"{p}_add" if sum_mode else f"{p}_conv2"  # noqa: E731  (conv2's output map)
    short_of = lambda p: f"{p}_add" if sum_mode else f"{p}_short"  # noqa: E731
    own_of = lambda p: (f"{p}_add",) if sum_mode else (f"{p}_conv2", f"{p}_short")  # noqa: E731
    blocks = [(f"s{s}b{b}", 2 if s > 0 and b == 0 else 1) for s in range(3) for b in range(model.blocks)]
    tensors, own = [], ("conv_0",)
    for p, stride in blocks:  # the tensor `own` feeds block p
        short = ("conv", short_of(p), 1, 2) if stride > 1 else ("elementwise", short_of(p), 1, 1)
        tensors.append((own, [("conv", f"{p}_conv1", 3, stride), short]))
        tensors.append(((f"{p}_conv1",), [("conv", out_of(p), 3, 1)]))
        own = own_of(p)
    return tensors  # the last block's output feeds the pool: nothing to backtrack into


def backtrack_input(model, inactive: dict, residual: str) -> dict:
    """MC-BI: extend the deactivation maps ``{node: bool [N, H, W, C]}`` backward from the
    output (see the module docstring); returns a new map dict (a superset of ``inactive``)."""
    require(model, DECLARED_GRAPH, "MC-BI (backtrack='bi')",
            "it walks the zoo's ResNet graph; use backtrack='bln' or 'none'")
    out = {k: np.asarray(v, bool).copy() for k, v in inactive.items()}
    for own, consumers in reversed(_tensors(model, residual)):
        n, h, w, c = out[own[0]].shape
        dead = np.ones((n, h, w, c), bool)
        for kind, name, k, stride in consumers:
            if kind == "elementwise":
                dead &= out[name]
            else:
                alive = ~out[name].all(-1)
                dead &= ~window_reach(alive, (h, w), k, stride)[..., None]
        for name in own:
            out[name] |= dead
    return out
