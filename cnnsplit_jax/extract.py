"""Turn a module (binary masks + head) into a standalone, physically smaller model.

Works from the model's topology only: each conv keeps the output channels its mask point
keeps (index 0 when a layer would be empty, as the reference), the next layers keep the
matching input channels (concatenated inputs are offset by the original branch widths), BN
entries are sliced, and the first FC layer keeps the input rows of the kept kernels of the
layers feeding it. Later FC layers and the head are copied unchanged.

``effective_masks`` applies the same keep-one rule to dense masks, so the vmapped masked
forward equals the extracted modules exactly (tests/test_extract.py).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .masks import mask_points
from .models import MaskedCNN, build_model

__all__ = [
    "ExtractedModule",
    "kept_indices",
    "effective_masks",
    "extract_module",
    "extract_all",
    "module_scores",
    "forward_flops",
]


class ExtractedModule(NamedTuple):
    """A standalone module: pruned model + its head (K -> 10 -> 1 sigmoid).

    model: the pruned ``MaskedCNN`` (same class, fewer channels); head: (w1 [K, 10], b1 [10],
    w2 [10], b2 []); class_index: the class it recognises; kept: kept channel indices per
    mask point of the base model.
    """

    model: MaskedCNN
    head: tuple
    class_index: int
    kept: dict


def kept_indices(model: MaskedCNN, masks_i: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Kept channel indices per mask point for one module (``> 0``; index 0 if none)."""
    out = {}
    for p in mask_points(model):
        idx = np.flatnonzero(np.asarray(masks_i[p.name]) > 0)
        out[p.name] = idx if idx.size else np.array([0])
    return out


def effective_masks(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Binary masks ``[..., C]`` with the keep-one rule applied (channel 0 of empty rows)."""
    out = {}
    for k, v in masks.items():
        b = (np.asarray(v) > 0).astype(np.float32)
        empty = b.sum(-1) == 0
        b[..., 0] = np.where(empty, 1.0, b[..., 0])
        out[k] = b
    return out


def _input_index(model: MaskedCNN, inputs: tuple[str, ...], kept: dict) -> np.ndarray:
    if not inputs:
        return np.arange(model.in_channels)
    spec = {s.name: s for s in model.topology}
    parts, off = [], 0
    for name in inputs:
        parts.append(kept[spec[name].mask] + off)
        off += spec[name].out_channels
    return np.concatenate(parts)


def extract_module(model: MaskedCNN, masks_i: Mapping[str, np.ndarray], head_i, class_index: int) -> ExtractedModule:
    """Build module ``class_index`` of ``model`` from its masks ``{point: [C]}`` and head."""
    kept = kept_indices(model, masks_i)
    channels = {s.name: int(kept[s.mask].size) for s in model.topology}
    kwargs = {"fc_hidden": model.fc_hidden} if hasattr(model, "fc_hidden") else {}
    # abstract construction (no random init, no per-shape compiles), then every variable is
    # filled from the base model's sliced weights
    small = nnx.eval_shape(lambda: build_model(
        model.arch, num_classes=model.num_classes, in_channels=model.in_channels,
        width=model.width, channels=channels, **kwargs))
    for s in model.topology:
        src, dst = getattr(model, s.name), getattr(small, s.name)
        o = kept[s.mask]
        i = _input_index(model, s.inputs, kept)
        dst.kernel.set_value(jnp.asarray(src.kernel[...][:, :, i][..., o]))
        for f in ("bias", "scale", "offset", "mean", "var"):
            getattr(dst, f).set_value(jnp.asarray(getattr(src, f)[...][o]))
    fc_names = [n for n in ("fc_13", "fc_14", "fc_15", "fc_12") if hasattr(model, n)]
    rows = _input_index(model, model.fc_input_layers, kept)
    for j, n in enumerate(fc_names):
        src, dst = getattr(model, n), getattr(small, n)
        dst.kernel.set_value(jnp.asarray(src.kernel[...][rows] if j == 0 else src.kernel[...]))
        dst.bias.set_value(jnp.asarray(src.bias[...]))
    leftover = [x for x in jax.tree.leaves(nnx.state(small)) if isinstance(x, jax.ShapeDtypeStruct)]
    if leftover:  # pragma: no cover - guards new architectures with unknown layers
        raise RuntimeError(f"extract_module left {len(leftover)} variables of {model.arch} unset")
    head = tuple(jnp.asarray(h) for h in head_i)
    return ExtractedModule(small, head, int(class_index), kept)


def extract_all(model: MaskedCNN, masks: Mapping[str, np.ndarray], heads) -> list[ExtractedModule]:
    """All N modules from stacked masks ``{point: [N, C]}`` and stacked heads."""
    n = next(iter(masks.values())).shape[0]
    return [
        extract_module(model, {k: np.asarray(v[c]) for k, v in masks.items()},
                       tuple(np.asarray(h[c]) for h in heads), c)
        for c in range(n)
    ]


@jax.jit
def _scores(model, head, x):
    w1, b1, w2, b2 = head
    z = jax.nn.relu(model(x))
    return jax.nn.sigmoid(jax.nn.relu(z @ w1 + b1) @ w2 + b2)


def module_scores(module: ExtractedModule, x: jax.Array) -> jax.Array:
    """Sigmoid scores [B] of an extracted module for normalised images x [B, 32, 32, C]."""
    return _scores(module.model, module.head, x)


def forward_flops(model: MaskedCNN, batch: int = 1) -> float:
    """Nominal FLOPs (2 x MACs) of one forward pass for ``batch`` 32x32 images.

    Conv layers count ``2 * H * W * k * k * Cin * Cout`` (padded taps included, the usual
    convention of the papers), FC layers ``2 * in * out``; BN, ReLU and pooling are ignored.
    """
    out = {s.name: s.out_channels for s in model.topology}
    total = 0
    for s in model.topology:
        cin = sum(out[i] for i in s.inputs) if s.inputs else model.in_channels
        total += 2 * s.spatial * s.spatial * s.ksize * s.ksize * cin * s.out_channels
    for n in ("fc_12", "fc_13", "fc_14", "fc_15"):
        if hasattr(model, n):
            fin, fout = getattr(model, n).kernel.shape
            total += 2 * fin * fout
    return float(total * batch)
