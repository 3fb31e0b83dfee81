"""Physical extraction of a module of an adapted model (``models.adapter``) whose convs form a
chain: every conv reads the previous conv's output channels (the first reads the image),
followed by the user's own glue (activations, pooling, reshapes), then dense layers.

A module keeps, at each conv, the output channels its mask keeps (the keep-one rule of
``extract.effective_masks``). Its parameters are sliced: a conv's kernel on its input
channels (the previous conv's kept channels) and output channels, its bias, the BatchNorm
that reads it (scale, bias, running mean and variance), and the rows of the first dense layer
that read the last conv's kept channels (its input is the last conv's positions x channels,
position-major as NHWC flattens, or one value per channel after global pooling). The user's
forward pass runs with those layers replaced by the same computations on the sliced
parameters (``jax.lax.conv_general_dilated`` with the layer's strides, padding and
dilations; BatchNorm in inference mode), so every intermediate tensor is physically smaller.

Anything else (ties, grouped convs, a norm that is not BatchNorm, a conv that does not read
the previous conv, a dense layer whose width is not a multiple of the last conv's channels)
is refused with the reason, and the extracted module is checked against the masked forward
pass on a probe input before it is returned: a graph that only looks like a chain (residual
adds) is refused too, never silently run wrong.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from .extract import effective_masks

__all__ = ["AdaptedModule", "extract_adapted", "ExtractionError"]


class ExtractionError(ValueError):
    """The adapted model's graph is not a chain of convs that extraction can slice."""


@dataclasses.dataclass
class AdaptedModule:
    """One physically smaller module of an adapted model.

    model: the ``AdaptedCNN`` (its forward pass is the glue); kept: ``{point: int [k]}`` kept
    channels; params: ``{layer path: {name: sliced array}}``; dense: the first dense layer's path.
    """

    model: object
    kept: dict
    params: dict
    dense: str

    def num_params(self) -> int:
        """Parameters of the sliced layers (convs, BatchNorm affine and statistics, the first
        dense layer)."""
        return int(sum(np.prod(a.shape) for p in self.params.values() for a in p.values()))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, K] of normalised images x [B, *input_shape]."""
        self.model.check_input(x)
        params = self.params

        def around(path, kind, layer, xin, call):
            p = params.get(path)
            if p is None:
                return call(xin)
            if kind == "conv":
                return _conv(layer, xin, p)
            if kind == "norm":
                return _batch_norm(layer, xin, p)
            return xin @ p["kernel"] + p["bias"] if "bias" in p else xin @ p["kernel"]

        return self.model._run(x, around, around=True)


def _pairs(v, n=2):
    v = 1 if v is None else v
    return (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)


def _conv(layer, x, p):
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], _pairs(layer.strides), canonicalize_padding(layer.padding, 2),
        lhs_dilation=_pairs(layer.input_dilation), rhs_dilation=_pairs(layer.kernel_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"] if "bias" in p else y


def _batch_norm(layer, x, p):
    y = (x - p["mean"]) * jax.lax.rsqrt(p["var"] + layer.epsilon)
    if "scale" in p:
        y = y * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _chain(model):
    """(conv paths in order, {conv: its BatchNorm path}, first dense path) or raise."""
    calls, where = model.calls, model._where
    info = {c.path: (c.layer_class, c.groups) for c in calls}
    if any(len(p.layers) > 1 for p in model.mask_points()):
        raise ExtractionError(f"{model.arch}: tied mask points gate residual pairs; extraction handles conv chains")
    norm_of = {}
    for i, c in enumerate(calls):
        if c.kind == "conv" and info[c.path][1] != 1:
            raise ExtractionError(f"{model.arch}: {c.path!r} is a grouped convolution")
        if c.kind != "norm":
            continue
        if where.get(c.path) is None:
            raise ExtractionError(f"{model.arch}: the norm at {c.path!r} does not read a conv directly")
        if info[c.path][0] != "BatchNorm":
            raise ExtractionError(f"{model.arch}: {c.path!r} is a {info[c.path][0]}; slicing its channels would "
                                  "change its statistics")
        norm_of[calls[i - 1].path] = c.path
    convs = [c.path for c in calls if c.kind == "conv"]
    last_conv = max(i for i, c in enumerate(calls) if c.kind == "conv")
    denses = [i for i, c in enumerate(calls) if c.kind == "dense"]
    if not denses or denses[0] < last_conv:
        raise ExtractionError(f"{model.arch}: extraction needs dense layers only after the last conv")
    return convs, norm_of, calls[denses[0]].path


def extract_adapted(model, masks, *, check: bool = True) -> AdaptedModule:
    """The physically smaller module of adapted ``model`` under ``masks`` ``{point: [C]}``
    (one module's masks; binarised with the keep-one rule).

    Raises:
      ExtractionError: the graph is not a chain (see the module docstring), or ``check``
        finds that the extracted module does not reproduce the masked forward pass.
    """
    if getattr(model, "mask_kind", None) != "kernel" or not hasattr(model, "calls"):
        raise ExtractionError("extract_adapted takes a model from cnnsplit_jax.adapt (kind='kernel')")
    convs, norm_of, dense = _chain(model)
    eff = effective_masks({k: np.asarray(v) for k, v in masks.items()})
    point_of = {c: p.name for p in model.mask_points() for c in p.layers}
    params, kept = {}, {}
    prev, prev_size = np.arange(model.input_shape[-1]), model.input_shape[-1]
    for conv in convs:
        arr = model.layer_arrays(conv)
        k = arr["kernel"]
        if k.shape[2] != prev_size:
            raise ExtractionError(f"{model.arch}: {conv!r} reads {k.shape[2]} channels, but the conv before it makes "
                                  f"{prev_size}: not a chain")
        name = point_of.get(conv)
        keep = np.flatnonzero(eff[name]) if name is not None else np.arange(k.shape[3])
        params[conv] = {"kernel": k[:, :, prev][..., keep], **({"bias": arr["bias"][keep]} if "bias" in arr else {})}
        if conv in norm_of:
            params[norm_of[conv]] = {n: a[keep] for n, a in model.layer_arrays(norm_of[conv]).items()}
        if name is not None:
            kept[name] = keep
        prev, prev_size = keep, k.shape[3]
    arr = model.layer_arrays(dense)
    rows, c_last = arr["kernel"].shape[0], prev_size
    if rows % c_last:
        raise ExtractionError(f"{model.arch}: the dense layer {dense!r} reads {rows} values, not a multiple of the "
                              f"last conv's {c_last} channels")
    idx = (np.arange(rows // c_last)[:, None] * c_last + prev[None, :]).ravel()
    params[dense] = {"kernel": arr["kernel"][idx], **({"bias": arr["bias"]} if "bias" in arr else {})}
    module = AdaptedModule(model, kept, params, dense)
    if check:
        x = jax.random.normal(jax.random.key(0), (2, *model.input_shape))
        try:
            got = module(x)
        except Exception as e:
            raise ExtractionError(f"{model.arch}: the extracted module cannot run ({type(e).__name__}: {e}); "
                                  "the convs do not form a chain: use the masked form") from e
        want = model(x, {k: jnp.asarray(v) for k, v in eff.items()})
        if not np.allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4):
            raise ExtractionError(f"{model.arch}: the extracted module does not reproduce the masked forward pass; "
                                  "the convs do not form a chain: use the masked form")
    return module
