"""Turn a module (binary masks + head) into a standalone, physically smaller model.

Works from the model's topology only: each conv keeps the output channels its mask point
keeps (index 0 when a layer would be empty, as the reference), the next layers keep the
matching input channels (concatenated inputs are offset by the original branch widths), BN
entries are sliced, and the first FC layer keeps the input rows of the kept kernels of the
layers feeding it. Later FC layers and the head are copied unchanged.

``models.effective_masks`` applies the same keep-one rule to dense masks, so the vmapped masked
forward equals the extracted modules exactly (tests/test_extract.py).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models import MaskedCNN, build_model, mask_points

__all__ = [
    "ExtractedModule",
    "kept_indices",
    "extract_module",
    "extract_all",
    "forward_flops",
]


class ExtractedModule(NamedTuple):
    """A standalone module: pruned model + its head (K -> 10 -> 1 sigmoid).

    model: the pruned ``MaskedCNN`` (same class, fewer channels); head: (w1 [K, 10], b1 [10],
    w2 [10], b2 []) or ``None`` (scored by logit ``class_index``); class_index: the class it
    recognises in its base model; kept: kept channel indices per mask point of the base model.
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


def _slots(kept: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Source index and validity of ``size`` slots filled by ``kept`` (padding: index 0, invalid)."""
    size = kept.size if size is None else size
    if size < kept.size:
        raise ValueError(f"cannot pad {kept.size} kept channels into {size} slots")
    idx = np.zeros(size, np.int64)
    idx[: kept.size] = kept
    return idx, np.arange(size) < kept.size


def _input_slots(model: MaskedCNN, inputs: tuple[str, ...], kept: dict, sizes: dict):
    """Source rows and validity of a layer's (padded) input channels; inputs concatenate."""
    if not inputs:
        return np.arange(model.in_channels), np.ones(model.in_channels, bool)
    spec = {s.name: s for s in model.topology}
    idx, ok, off = [], [], 0
    for name in inputs:
        i, v = _slots(kept[spec[name].mask], sizes.get(spec[name].mask))
        idx.append(i + off)
        ok.append(v)
        off += spec[name].out_channels
    return np.concatenate(idx), np.concatenate(ok)


def _fc_rows(model: MaskedCNN, kept: dict, sizes: dict):
    """Rows of the first FC layer: (position-major) flattened positions x kept channels."""
    i, v = _input_slots(model, model.fc_input_layers, kept, sizes)
    per_pos = sum(model.spec(n).out_channels for n in model.fc_input_layers)
    pos = np.arange(model.fc_positions)[:, None] * per_pos
    return (pos + i[None, :]).reshape(-1), np.tile(v, model.fc_positions)


def extract_module(
    model: MaskedCNN,
    masks_i: Mapping[str, np.ndarray],
    head_i,
    class_index: int,
    pad_to: Mapping[str, int] | None = None,
) -> ExtractedModule:
    """Build module ``class_index`` of ``model`` from its masks ``{point: [C]}`` and head.

    ``pad_to``: optional ``{point: channels}`` >= the kept counts; the extra channels get zero
    weights (and zero BN scale), so the module computes exactly the same scores at a common
    shape (used to stack modules of different sizes for one vmapped call). ``head_i`` may be
    ``None`` (modules scored by their class logit).
    """
    kept = kept_indices(model, masks_i)
    sizes = dict(pad_to or {})
    channels = {s.name: int(sizes.get(s.mask, kept[s.mask].size)) for s in model.topology}
    # abstract construction (no random init, no per-shape compiles), then every variable is
    # filled from the base model's sliced weights
    cfg = model.config()
    arch = cfg.pop("arch")
    cfg.pop("channels", None)  # extracting from an extracted model: ``channels`` replaces its own
    small = nnx.eval_shape(lambda: build_model(arch, channels=channels, **cfg))
    for s in model.topology:
        src, dst = getattr(model, s.name), getattr(small, s.name)
        o, ov = _slots(kept[s.mask], sizes.get(s.mask))
        i, iv = _input_slots(model, s.inputs, kept, sizes)
        w = np.asarray(src.kernel[...])[:, :, i][..., o] * (iv[:, None] & ov[None, :])
        dst.kernel.set_value(jnp.asarray(w, jnp.float32))
        for f in ("bias", "scale", "offset", "mean") if src.bn else ("bias",):
            dst_v = np.asarray(getattr(src, f)[...])[o] * ov
            getattr(dst, f).set_value(jnp.asarray(dst_v, jnp.float32))
        if src.bn:
            dst.var.set_value(jnp.asarray(np.where(ov, np.asarray(src.var[...])[o], 1.0), jnp.float32))
    rows, rv = _fc_rows(model, kept, sizes)
    for j, n in enumerate(model.fc_layers):
        src, dst = getattr(model, n), getattr(small, n)
        k = np.asarray(src.kernel[...])
        dst.kernel.set_value(jnp.asarray(k[rows] * rv[:, None] if j == 0 else k))
        dst.bias.set_value(jnp.asarray(src.bias[...]))
    leftover = [x for x in jax.tree.leaves(nnx.state(small)) if isinstance(x, jax.ShapeDtypeStruct)]
    if leftover:  # pragma: no cover - guards new architectures with unknown layers
        raise RuntimeError(f"extract_module left {len(leftover)} variables of {model.arch} unset")
    head = None if head_i is None else tuple(jnp.asarray(h) for h in head_i)
    return ExtractedModule(small, head, int(class_index), kept)


def extract_all(model: MaskedCNN, masks: Mapping[str, np.ndarray], heads) -> list[ExtractedModule]:
    """All N modules from stacked masks ``{point: [N, C]}`` and stacked heads (or ``None``)."""
    n = next(iter(masks.values())).shape[0]
    return [
        extract_module(model, {k: np.asarray(v[c]) for k, v in masks.items()},
                       None if heads is None else tuple(np.asarray(h[c]) for h in heads), c)
        for c in range(n)
    ]


def forward_flops(model: MaskedCNN, batch: int = 1) -> float:
    """Nominal FLOPs (2 x MACs) of one forward pass for ``batch`` 32x32 images.

    Conv layers count ``2 * H_out * W_out * k * k * Cin * Cout`` (padded taps included, the usual
    convention of the papers), FC layers ``2 * in * out``; BN, ReLU and pooling are ignored.
    """
    out = {s.name: s.out_channels for s in model.topology}
    total = 0
    for s in model.topology:
        cin = sum(out[i] for i in s.inputs) if s.inputs else model.in_channels
        hw = s.out_spatial  # output positions per side
        total += 2 * hw * hw * s.ksize * s.ksize * cin * s.out_channels
    for n in model.fc_layers:
        fin, fout = getattr(model, n).kernel.shape
        total += 2 * fin * fout
    return float(total * batch)
