"""Physical extraction of a module of an adapted model (``models.adapter``): every conv reads
the image or the channels of one mask point (a chain, or residual blocks whose added convs
share a tied point: ``adapt(..., ties="auto")``), with the user's own glue (activations,
pooling, residual adds, reshapes) in between, then dense layers. Which point a layer reads
is traced from the graph (``models.ties.trace_channels``).

A module keeps, at each conv, the output channels its mask keeps (the keep-one rule of
``models.effective_masks``). Its parameters are sliced: a conv's kernel on its input
channels (the kept channels of the point it reads) and output channels, its bias, the BatchNorm
that reads it (scale, bias, running mean and variance), and the rows of the first dense layer
that read the kept channels of the point before it (positions x channels,
position-major as NHWC flattens, or one value per channel after global pooling). The user's
forward pass runs with those layers replaced by the same computations on the sliced
parameters (``jax.lax.conv_general_dilated`` with the layer's strides, padding and
dilations; BatchNorm in inference mode), so every intermediate tensor is physically smaller.

Anything else (grouped convs, the zoo's ``ConvBN``, a norm that is not BatchNorm, a layer
reading a concatenation or an untied residual sum, a dense layer whose width is not a
multiple of its point's channels) is refused with the reason, and the extracted module is
checked against the masked forward pass on a probe input before it is returned: it is never
silently run wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from ..models.ties import IMAGE
from ..models.protocol import KERNEL_MASKS, USER_DEFINITION, has
from ..models import effective_masks

__all__ = ["AdaptedModule", "extract_adapted", "extract_adapted_all", "adapted_flops", "ExtractionError"]


class ExtractionError(ValueError):
    """The adapted model's graph has a layer extraction cannot slice (the message says which)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["model", "kept", "dense"])
@dataclasses.dataclass(frozen=True, eq=False)
class AdaptedModule:
    """One physically smaller module of an adapted model (a pytree: the sliced ``params``
    are its leaves, so modules stack into a jitted composition).

    model: the ``AdaptedCNN`` (its forward pass is the glue); kept: ``((point, (int, ...)),
    ...)`` kept channels; params: ``{layer path: {name: sliced array}}``; dense: the first
    dense layer's path.
    """

    model: object
    kept: tuple
    params: dict
    dense: str

    def flops(self) -> float:
        """Nominal FLOPs (2 x MACs) of one image: its sliced convs and dense layers
        (``adapted_flops``)."""
        return adapted_flops(self.model, self.params)

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


def adapted_flops(model, params: dict | None = None) -> float:
    """Nominal FLOPs (2 x MACs) of one image through ``model``'s convs (``2 * H_out * W_out *
    k_h * k_w * C_in * C_out``, as ``extract.forward_flops``) and dense layers, with the
    kernels in ``params`` (a module's sliced layers) where given."""
    total = 0.0
    for c in model.calls:
        if c.kind not in ("conv", "dense"):
            continue
        k = (params or {}).get(c.path, {}).get("kernel")
        k = model.layer_arrays(c.path)["kernel"] if k is None else k
        positions = math.prod(c.out_shape[:-1]) if c.kind == "conv" else 1
        total += 2.0 * positions * math.prod(k.shape)
    return total


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


def _layers(model):
    """(conv paths in call order, {conv: its BatchNorm path}, first dense path) or raise."""
    calls, where = model.calls, model._where
    norm_of = {}
    for i, c in enumerate(calls):
        if c.kind == "conv" and c.groups != 1:
            raise ExtractionError(f"{model.arch}: {c.path!r} is a grouped convolution")
        if c.kind == "conv" and c.layer_class != "Conv":
            raise ExtractionError(f"{model.arch}: {c.path!r} is a {c.layer_class}, not a flax Conv (the zoo's own "
                                  "layers are extracted by modules.extract)")
        if c.kind != "norm":
            continue
        if where.get(c.path) is None:
            raise ExtractionError(f"{model.arch}: the norm at {c.path!r} does not read a conv directly")
        if c.layer_class != "BatchNorm":
            raise ExtractionError(f"{model.arch}: {c.path!r} is a {c.layer_class}; slicing its channels would "
                                  "change its statistics")
        norm_of[calls[i - 1].path] = c.path
    convs = [c.path for c in calls if c.kind == "conv"]
    last_conv = max(i for i, c in enumerate(calls) if c.kind == "conv")
    denses = [i for i, c in enumerate(calls) if c.kind == "dense"]
    if not denses or denses[0] < last_conv:
        raise ExtractionError(f"{model.arch}: extraction needs dense layers only after the last conv")
    return convs, norm_of, calls[denses[0]].path


def _read(model, layer, reads, kept, n_in):
    """``(point, indices)``: the mask point whose channels ``layer`` reads (None: the image's)
    and the input channels it keeps (all of the image's, or that point's kept channels)."""
    got = reads.get(layer, frozenset())
    if got == {IMAGE}:
        return None, np.arange(n_in)
    if IMAGE in got:
        raise ExtractionError(f"{model.arch}: {layer!r} reads the image added to conv outputs {sorted(got - {IMAGE})}; "
                              "their channels cannot be dropped")
    if len(got) > 1:
        raise ExtractionError(f"{model.arch}: {layer!r} reads the sum of mask points {sorted(got)} that are not "
                              "tied; adapt the model with ties='auto' so that they share one mask")
    if not got:
        raise ExtractionError(f"{model.arch}: which channels {layer!r} reads cannot be followed (a concatenation "
                              "of several convs, or an operation the tracer does not know): use the masked form")
    (point,) = got
    if point not in kept:
        raise ExtractionError(f"{model.arch}: {layer!r} reads mask point {point!r} before its convs run")
    return point, kept[point]


def extract_adapted(model, masks, *, check: bool = True, graph=None) -> AdaptedModule:
    """The physically smaller module of adapted ``model`` under ``masks`` ``{point: [C]}``
    (one module's masks; binarised with the keep-one rule).

    Raises:
      ExtractionError: a graph extraction cannot slice (see the module docstring), or
        ``check`` finds that the extracted module does not reproduce the masked forward pass.

    ``graph``: ``model.channel_graph()`` when already traced (extracting many modules).
    """
    if not (has(model, KERNEL_MASKS) and has(model, USER_DEFINITION)):
        raise ExtractionError("extract_adapted takes a model from cnnsplit_jax.adapt (kind='kernel')")
    convs, norm_of, dense = _layers(model)
    _, reads = graph or model.channel_graph()
    eff = effective_masks({k: np.asarray(v) for k, v in masks.items()})
    point_of = {c: p.name for p in model.mask_points() for c in p.layers}
    params, kept = {}, {}
    for conv in convs:
        arr = model.layer_arrays(conv)
        k = arr["kernel"]
        _, rows = _read(model, conv, reads, kept, k.shape[2])
        name = point_of.get(conv)
        keep = np.flatnonzero(eff[name]) if name is not None else np.arange(k.shape[3])
        params[conv] = {"kernel": k[:, :, rows][..., keep], **({"bias": arr["bias"][keep]} if "bias" in arr else {})}
        if conv in norm_of:
            params[norm_of[conv]] = {n: a[keep] for n, a in model.layer_arrays(norm_of[conv]).items()}
        if name is not None:
            kept[name] = keep
    arr = model.layer_arrays(dense)
    point, feats = _read(model, dense, reads, kept, arr["kernel"].shape[0])
    rows = arr["kernel"].shape[0]
    c_last = rows if point is None else next(p.size for p in model.mask_points() if p.name == point)
    if rows % c_last:
        raise ExtractionError(f"{model.arch}: the dense layer {dense!r} reads {rows} values, not a multiple of the "
                              f"{c_last} channels of {point!r}")
    idx = (np.arange(rows // c_last)[:, None] * c_last + feats[None, :]).ravel()
    params[dense] = {"kernel": arr["kernel"][idx], **({"bias": arr["bias"]} if "bias" in arr else {})}
    module = AdaptedModule(model, tuple((k, tuple(int(i) for i in v)) for k, v in kept.items()), params, dense)
    if check:
        x = jax.random.normal(jax.random.key(0), (2, *model.input_shape))
        try:
            got = module(x)
        except Exception as e:
            raise ExtractionError(f"{model.arch}: the extracted module cannot run ({type(e).__name__}: {e}); "
                                  "its graph is not one extraction can slice: use the masked form") from e
        want = model(x, {k: jnp.asarray(v) for k, v in eff.items()})
        if not np.allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4):
            raise ExtractionError(f"{model.arch}: the extracted module does not reproduce the masked forward pass; "
                                  "its graph is not one extraction can slice: use the masked form")
    return module


def extract_adapted_all(pairs) -> tuple[AdaptedModule, ...]:
    """``extract_adapted`` of every ``(model, masks {point: [C]})`` pair, tracing each distinct
    model's graph once."""
    graphs: dict[int, tuple] = {}
    out = []
    for model, masks in pairs:
        if id(model) not in graphs:
            graphs[id(model)] = model.channel_graph()
        out.append(extract_adapted(model, masks, graph=graphs[id(model)]))
    return tuple(out)
