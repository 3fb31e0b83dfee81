"""The forward pass of modules: one interface, three forward forms.

A *module* is module ``c`` of a module set. What computing it means depends on its forward form (``ModuleSet.forward_form``):

| form | computes | score | positive ("my class") |
|---|---|---|---|
| ``masked`` | the base model under module c's binary kernel masks (keep-one rule) | head sigmoid (GradSplitter), else logit c (CNNSplitter) | score > 0.5 / argmax of its logits is c |
| ``extracted`` | the physically pruned model (``extract.extract_module``) | as ``masked`` | as ``masked`` |
| ``concern`` | the base ResNet under module c's position maps, then its 2-column head | ``softmax([l_c, l_uc, 0, ...])[0]`` | argmax of ``[l_c, l_uc, 0, ...]`` is l_c |

Every form is a ``ForwardForm`` of pure functions over a *group* (the picked modules stacked into one
pytree; jit- and vmap-safe)::

    group = fwd.stack(picks, execution=..., chunk=..., align=...)   # host side
    logits = fwd.logits(group, x, input)     # [B, n, K]
    scores = fwd.scores(group, logits)       # [B, n]
    positive = fwd.positive(group, logits)   # bool [B, n]

``fwd.combine`` is how a composition made only of this form turns (scores, positive) into
the scores whose argmax is the prediction (``None``: the scores themselves; concern: Pan &
Rajan's vote). ``module_outputs`` runs all modules of a set on a dataset. The splitters share
the cores: ``masked_logits`` (GradSplitter's loss and features, CNNSplitter's fitness) and
``node_logits``.

Inputs: ``input="raw"``: pixels in [0, 255] ``[B, 32, 32, C]``, normalised inside with each
module's own base model statistics; ``"normalized"``: already normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import mesh as meshlib
from ..data import map_batches, normalize
from ..models import mask_points
from ..models.masks import PerUse
from ..models.protocol import DECLARED_GRAPH, has
from ..models import effective_masks
from .extract import ExtractedModule, extract_module, kept_indices
from .extract_adapted import extract_adapted_all
from .heads import Heads, concern_positive, positive_probability, scores_from_logits, vote_scores

__all__ = ["Pick", "ForwardForm", "FORWARD_FORMS", "MaskedGroup", "ExtractedGroup", "ConcernGroup", "default_chunk",
           "masked_logits", "node_logits", "model_input",
           "group_outputs", "module_outputs", "extracted_scores"]

INPUTS = ("raw", "normalized")


class Pick(NamedTuple):
    """One module: module ``source_class`` of ``module_set``; ``source`` labels it in reports,
    ``name`` names its class in a composition (default: the source's class name)."""

    module_set: object
    source_class: int
    source: str = ""
    name: str | None = None


def default_chunk(n: int, chunk: int | None = 0) -> int:
    """Modules per vmapped group: ``chunk`` when > 0 (at most n); else 2 on the CPU (one vmap
    over 10 modules makes a 640-image batch whose activations leave the cache: measured 1.7x
    slower) and all n on GPU/TPU."""
    if chunk and chunk > 0:
        return min(int(chunk), n)
    return min(2, n) if jax.default_backend() == "cpu" else n


def model_input(x, mean, std, input: str):
    """Images as the model reads them: raw uint8 pixels normalised with (mean, std)
    (``data.normalize``, which refuses other dtypes), or as given."""
    return normalize(x, mean, std) if input == "raw" else x.astype(jnp.float32)


# ------------------------------------------------------------------------------ cores
def masked_logits(model, masks, x, chunk: int | None = None, loop: str = "unroll",
                  mask_fn: Callable | None = None, remat: bool = False, shards: int = 1) -> jax.Array:
    """[N, B, K]: ``model``'s logits under each of N masks ``{point: [N, C]}`` on normalised x.

    chunk: modules per vmapped group (None: one vmap over all N). loop: ``"unroll"``: the
    groups are separate vmaps in one traced program (fastest forward+backward on the CPU);
    ``"map"``: ``lax.map`` over groups (N padded to a multiple of ``chunk``): compile time
    and memory independent of N, for hundreds of modules (CNNSplitter's populations).
    mask_fn: applied to a mask at each use (``PerUse``), e.g. GradSplitter's straight-through
    step; None: the masks as given. remat: recompute each group's activations in the backward
    pass (``jax.checkpoint`` inside ``lax.map``, whose sequential groups bound the memory to one
    group's activations instead of all N's), for a second forward.
    shards: devices the module axis is split over (``mesh.axis_size(mesh, "modules")``; N a
    multiple of it): one vmap over all N, which the partitioner splits by device; with
    ``remat`` or ``loop="map"``, each ``lax.map`` step takes ``chunk`` modules from every
    device's block, so the groups never cross devices.
    """
    n = next(iter(masks.values())).shape[0]
    f = jax.vmap(lambda m: model(x, m if mask_fn is None else PerUse(m, mask_fn)))
    if remat:
        f, loop = jax.checkpoint(f), "map"
    if shards > 1:
        return meshlib.map_blocks(f, masks, shards, chunk if remat or loop == "map" else None)
    if chunk is None or chunk >= n:
        return f(masks)
    if loop == "unroll":
        return jnp.concatenate([f({k: v[i:i + chunk] for k, v in masks.items()})
                                for i in range(0, n, chunk)])
    pad = (-n) % chunk
    padded = {k: jnp.concatenate([v, jnp.repeat(v[:1], pad, 0)]) for k, v in masks.items()}
    groups = {k: v.reshape(-1, chunk, v.shape[-1]) for k, v in padded.items()}
    out = jax.lax.map(f, groups)
    return out.reshape(-1, *out.shape[2:])[:n]


def node_logits(model, keep, head_w, head_b, x, chunk: int | None = None) -> jax.Array:
    """[B, n, 2] binary logits (concerned, unconcerned) of n concern modules: ``model`` under
    ``keep`` ``{node: float [n, H, W, C]}`` (1 kept) on normalised x, then each module's
    channeled head ``head_w [n, F, 2]``, ``head_b [n, 2]``; one vmap (``lax.map`` in groups of
    ``chunk``)."""

    def one(args):
        kp, w, b = args
        return model.node_forward(x, kp) @ w + b

    n = head_w.shape[0]
    if chunk is None or chunk >= n:
        out = jax.vmap(lambda kp, w, b: one((kp, w, b)))(keep, head_w, head_b)
    else:
        out = jax.lax.map(one, (keep, head_w, head_b), batch_size=chunk)
    return jnp.swapaxes(out, 0, 1)


# ------------------------------------------------------------------------------ groups
def _pytree(data, meta):
    def deco(cls):
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)

    return deco


@_pytree(["params", "masks", "heads", "classes", "mean", "std"],
         ["graphdef", "base_index", "execution", "chunk"])
@dataclasses.dataclass(frozen=True)
class MaskedGroup:
    """Modules run as masked forwards of base models with one structure.

    params: ``nnx.State`` of the M base models stacked [M, ...]; masks: ``{point: float 0/1
    [n, C]}`` (keep-one rule applied); heads: ``Heads`` [n, ...] or None; classes: int32 [n]
    module class in its base model; mean/std float32 [M, C]; base_index: static base model of
    each module; execution: ``"vmap"`` (one vmap over per-module gathered parameters) or
    ``"unrolled"`` (one vmap per base model); chunk: modules per vmapped group.
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    masks: dict
    heads: Heads | None
    classes: jax.Array
    mean: jax.Array
    std: jax.Array
    base_index: tuple
    execution: str
    chunk: int
    form = "masked"


@_pytree(["params", "heads", "classes", "mean", "std", "tails"], ["graphdefs", "execution", "tail_of"])
@dataclasses.dataclass(frozen=True)
class ExtractedGroup:
    """Physically pruned modules of one structure group.

    ``execution="unrolled"``: graphdefs/params hold one entry per module (own shapes);
    ``"vmap"``: one graphdef and params stacked [n, ...] (zero-padded to common shapes).
    heads: ``Heads`` [n, ...] or None; classes int32 [n]; mean/std float32 [n, C]. tails: per
    distinct base model, its FC layers after the first ``((kernel, bias), ...)``, copied
    unchanged by extraction, so they run once on the stacked hidden activations of that
    base's modules; tail_of: static base index per module (``()``: a single FC layer).
    """

    graphdefs: tuple
    params: tuple
    heads: Heads | None
    classes: jax.Array
    mean: jax.Array
    std: jax.Array
    tails: tuple
    execution: str
    tail_of: tuple
    form = "extracted"


@_pytree(["params", "keep", "head_w", "head_b", "mean", "std"],
         ["graphdef", "base_index", "num_classes", "chunk"])
@dataclasses.dataclass(frozen=True)
class ConcernGroup:
    """Concern-identification modules of ResNets with one structure.

    params: the M base models' ``nnx.State`` stacked [M, ...]; keep: ``{node: float 0/1
    [n, H, W, C]}``; head_w [n, F, 2] / head_b [n, 2]; mean/std float32 [M, C]; base_index:
    static base model per module; num_classes: the base models' class count.
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    keep: dict
    head_w: jax.Array
    head_b: jax.Array
    mean: jax.Array
    std: jax.Array
    base_index: tuple
    num_classes: int
    chunk: int
    form = "concern"


def _distinct_bases(picks):
    """(module sets with distinct base models, base index per pick)."""
    sets, base_of, ids = [], [], []
    for p in picks:
        if id(p.module_set.base) not in ids:
            sets.append(p.module_set)
            ids.append(id(p.module_set.base))
        base_of.append(ids.index(id(p.module_set.base)))
    return sets, base_of


def _norms(sets) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray([ms.normalization[0] for ms in sets], jnp.float32)
    std = jnp.asarray([ms.normalization[1] for ms in sets], jnp.float32)
    return mean, std


def _stack_params(bases):
    return jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in bases])


def _stack_heads(heads_list) -> Heads | None:
    if heads_list[0] is None:
        return None
    return Heads(*(jnp.stack([jnp.asarray(h[j]) for h in heads_list]) for j in range(4)))


def _classes(picks) -> jax.Array:
    return jnp.asarray([p.source_class for p in picks], jnp.int32)


def _by_base(n_bases, base_index, run_base):
    """Run ``run_base(b, idx)`` ([n_b, ...] outputs) per base model and restore pick order."""
    outs, cols = [], []
    for b in range(n_bases):
        idx = np.asarray([i for i, bi in enumerate(base_index) if bi == b])
        outs.append(run_base(b, idx))
        cols.extend(idx.tolist())
    out = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
    return out[np.argsort(cols)] if cols != list(range(len(base_index))) else out


# --- masked -------------------------------------------------------------------------
def _stack_masked(picks, *, execution="unrolled", chunk=None, **_) -> MaskedGroup:
    sets, base_of = _distinct_bases(picks)
    bases = [ms.base for ms in sets]
    points = [pt.name for pt in mask_points(bases[0])]
    eff = [effective_masks({k: p.module_set.module_masks(p.source_class)[k][None] for k in points})
           for p in picks]
    masks = {k: jnp.asarray(np.concatenate([e[k] for e in eff])) for k in points}
    heads = _stack_heads([p.module_set.module_head(p.source_class) for p in picks])
    mean, std = _norms(sets)
    return MaskedGroup(nnx.graphdef(bases[0]), _stack_params(bases), masks, heads, _classes(picks),
                       mean, std, tuple(base_of), execution, default_chunk(len(picks), chunk))


def _masked_logits(g: MaskedGroup, x, input) -> jax.Array:
    n_bases = g.mean.shape[0]
    if n_bases == 1 or g.execution == "unrolled":
        def run_base(b, idx):
            model = nnx.merge(g.graphdef, jax.tree.map(lambda a: a[b], g.params))
            return masked_logits(model, {k: v[idx] for k, v in g.masks.items()},
                                 model_input(x, g.mean[b], g.std[b], input), g.chunk)

        logits = _by_base(n_bases, g.base_index, run_base)
    else:  # one vmap over modules with their base model's parameters gathered per module
        bi = np.asarray(g.base_index)

        def one(p, mk, mean, std):
            return nnx.merge(g.graphdef, p)(model_input(x, mean, std, input), mk)

        logits = jax.vmap(one)(jax.tree.map(lambda a: a[bi], g.params), g.masks, g.mean[bi], g.std[bi])
    return jnp.swapaxes(logits, 0, 1)


def _kernel_scores(g, logits):
    return scores_from_logits(g.heads, g.classes, logits)


def _kernel_positive(g, logits):
    if g.heads is not None:
        return _kernel_scores(g, logits) > 0.5
    return logits.argmax(-1) == g.classes[None, :]


# --- extracted ----------------------------------------------------------------------
def _aligned(n: int, full: int, align: int) -> int:
    return min(full, -(-n // align) * align) if align > 1 else n


def _stack_extracted(picks, *, execution="unrolled", align=8, **_) -> ExtractedGroup:
    heads = [p.module_set.module_head(p.source_class) for p in picks]
    if not has(picks[0].module_set.base, DECLARED_GRAPH):  # a user's model: one by one, each its own shapes
        mods = extract_adapted_all([(p.module_set.base, p.module_set.module_masks(p.source_class)) for p in picks])
        return ExtractedGroup((), mods, _stack_heads(heads), _classes(picks), *_norms([p.module_set for p in picks]),
                              (), "adapted", ())
    kept = [kept_indices(p.module_set.base, p.module_set.module_masks(p.source_class)) for p in picks]
    full = {pt.name: pt.size for pt in mask_points(picks[0].module_set.base)}
    if execution == "vmap":  # one common (aligned) shape for the whole group
        common = {k: _aligned(max(kp[k].size for kp in kept), full[k], align) for k in full}
        pads = [common] * len(picks)
    else:  # each module its own shape, channel counts rounded up to a multiple of `align`
        pads = [{k: _aligned(kp[k].size, full[k], align) for k in full} for kp in kept]
    mods = [extract_module(p.module_set.base, p.module_set.module_masks(p.source_class),
                           p.module_set.module_head(p.source_class), p.source_class, pad)
            for p, pad in zip(picks, pads)]
    splits = [nnx.split(m.model) for m in mods]
    if execution == "vmap":
        graphdefs = (splits[0][0],)
        params = (jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in splits]),)
    else:
        graphdefs = tuple(g for g, _ in splits)
        params = tuple(s for _, s in splits)
    mean, std = _norms([p.module_set for p in picks])
    base = picks[0].module_set.base
    tails, tail_of = (), ()
    if len(base.fc_layers) > 1:
        sets, tail_of = _distinct_bases(picks)
        tails = tuple(tuple((getattr(ms.base, n).kernel[...], getattr(ms.base, n).bias[...])
                            for n in base.fc_layers[1:]) for ms in sets)
    return ExtractedGroup(graphdefs, params, _stack_heads([m.head for m in mods]), _classes(picks),
                          mean, std, tails, execution, tuple(tail_of))


def _tail(h, layers):
    for j, (w, b) in enumerate(layers):
        h = h @ w + b
        if j < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def _extracted_logits(g: ExtractedGroup, x, input) -> jax.Array:
    stop = 1 if g.tails else None  # with shared tails: modules run up to their first FC

    def run(model, mean, std):
        return model.fc_chain(model.features(model_input(x, mean, std, input)), 0, stop)

    if g.execution == "adapted":  # AdaptedModule pytrees (modules.extract_adapted)
        h = jnp.stack([m(model_input(x, g.mean[i], g.std[i], input)) for i, m in enumerate(g.params)])
    elif g.execution == "vmap":
        h = jax.vmap(lambda p, m, s: run(nnx.merge(g.graphdefs[0], p), m, s))(g.params[0], g.mean, g.std)
    else:
        h = jnp.stack([run(nnx.merge(gd, p), g.mean[i], g.std[i])
                       for i, (gd, p) in enumerate(zip(g.graphdefs, g.params))])
    if g.tails:  # one matmul chain per base model
        b = h.shape[1]
        h = _by_base(len(g.tails), g.tail_of, lambda t, idx: _tail(
            h[idx].reshape(len(idx) * b, -1), g.tails[t]).reshape(len(idx), b, -1))
    return jnp.swapaxes(h, 0, 1)


@jax.jit
def _single_scores(g: ExtractedGroup, x):
    return _kernel_scores(g, _extracted_logits(g, x, "normalized"))[:, 0]


def extracted_scores(module: ExtractedModule, x: jax.Array) -> jax.Array:
    """Score [B] of one extracted module on normalised images x (its own pruned model, its
    head or its class logit): the ``extracted`` form for a single module."""
    g = ExtractedGroup((nnx.graphdef(module.model),), (nnx.state(module.model),),
                       _stack_heads([module.head]), jnp.asarray([module.class_index], jnp.int32),
                       jnp.zeros((1, 1)), jnp.ones((1, 1)), (), "unrolled", ())
    return _single_scores(g, x)


# --- concern ------------------------------------------------------------------------
def _stack_concern(picks, *, chunk=None, **_) -> ConcernGroup:
    sets, base_of = _distinct_bases(picks)
    bases = [ms.base for ms in sets]
    keeps = [p.module_set.keep(p.source_class) for p in picks]
    keep = {k: jnp.asarray(np.stack([kp[k] for kp in keeps])) for k in keeps[0]}
    head_w = jnp.asarray(np.stack([p.module_set.head_w[p.source_class] for p in picks]))
    head_b = jnp.asarray(np.stack([p.module_set.head_b[p.source_class] for p in picks]))
    mean, std = _norms(sets)
    return ConcernGroup(nnx.graphdef(bases[0]), _stack_params(bases), keep, head_w, head_b, mean, std,
                        tuple(base_of), int(bases[0].num_classes), default_chunk(len(picks), chunk))


def _concern_logits(g: ConcernGroup, x, input) -> jax.Array:
    def run_base(b, idx):
        model = nnx.merge(g.graphdef, jax.tree.map(lambda a: a[b], g.params))
        out = node_logits(model, {k: v[idx] for k, v in g.keep.items()}, g.head_w[idx], g.head_b[idx],
                          model_input(x, g.mean[b], g.std[b], input), g.chunk)
        return jnp.swapaxes(out, 0, 1)

    return jnp.swapaxes(_by_base(g.mean.shape[0], g.base_index, run_base), 0, 1)


# ------------------------------------------------------------------------------ the kinds
class ForwardForm(NamedTuple):
    """The forward of one form of module (see the module docstring)."""

    name: str
    stack: Callable
    logits: Callable
    scores: Callable
    positive: Callable
    combine: Callable | None = None


FORWARD_FORMS: dict[str, ForwardForm] = {
    "masked": ForwardForm("masked", _stack_masked, _masked_logits, _kernel_scores, _kernel_positive),
    "extracted": ForwardForm("extracted", _stack_extracted, _extracted_logits, _kernel_scores, _kernel_positive),
    "concern": ForwardForm("concern", _stack_concern, _concern_logits,
                    lambda g, lg: positive_probability(lg, g.num_classes),
                    lambda g, lg: concern_positive(lg, g.num_classes), vote_scores),
}


def group_outputs(group, x: jax.Array, input: str = "raw") -> tuple[jax.Array, jax.Array]:
    """(scores [B, n], positive bool [B, n]) of a group's modules on images x."""
    fwd = FORWARD_FORMS[group.form]
    logits = fwd.logits(group, x, input)
    return fwd.scores(group, logits), fwd.positive(group, logits)


_group_outputs_jit = jax.jit(group_outputs, static_argnames=("input",))


def module_outputs(ms, x_u8: np.ndarray, *, form: str = "masked", batch_size: int = 256,
                   classes: Sequence[int] | None = None, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n, N], positive bool [n, N]) of modules ``classes`` (default all) of module
    set ``ms`` on raw images ``x_u8`` [n, 32, 32, C], in padded batches; ``mesh`` (a
    ``Mesh`` or None): each batch split over its ``data`` axis when it divides it."""
    classes = range(ms.num_modules) if classes is None else classes
    fwd = FORWARD_FORMS[ms.forward_form(form)]
    group = fwd.stack([Pick(ms, int(c)) for c in classes])
    return map_batches(lambda xb: _group_outputs_jit(group, meshlib.shard_batch(jnp.asarray(xb), mesh), input="raw"),
                       [x_u8], batch_size)
