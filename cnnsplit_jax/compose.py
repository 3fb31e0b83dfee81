"""Compose modules from one or many module sets into one classifier: a pytree + ``apply``.

A ``Composition`` holds K modules (one per output column) and is a JAX pytree, so
``apply(comp, x) -> scores [B, K]`` can be jitted, vmapped or embedded in other code::

    comp = compose([Pick(ms_a, 0), Pick(ms_b, 3), Pick(ms_c, 1)])   # K = 3 columns
    scores = jax.jit(apply)(comp, x_uint8)                          # [B, 3]
    pred = scores.argmax(-1)                                        # composed label

Column k is the module ``picks[k].source_class`` of ``picks[k].module_set``; ``comp.labels``
maps each composed class to its source explicitly (``ClassRef``). As in the papers, scores of
different modules are compared directly (no calibration): head sigmoids for GradSplitter
module sets, class logits for module sets without heads.

**Inputs.** ``input="raw"`` (default): images with pixel values in [0, 255] (uint8 or float)
``[B, 32, 32, C]``; every module normalises them with its own base model's statistics, so
modules of models trained on different datasets compose correctly. ``input="normalized"``:
already-normalised images; all sources must then share one normalisation (else ValueError).

**Execution** (all inside the one traced ``apply``, no host loop):

* ``form="masked"``: modules run as the base model under their binary masks. Modules that
  share a base model are one ``vmap`` over stacked masks and heads (split into vmapped groups
  of ``chunk`` on the CPU, as GradSplitter). Modules of several base models with the same
  structure (architecture, width, classes) form one group whose base parameters are stacked:
  ``execution="vmap"`` runs one vmap over per-module gathered parameters (one batched/grouped
  convolution per layer: the accelerator default); ``execution="unrolled"`` runs one vmap per
  base model (the CPU default: XLA:CPU's grouped convolutions are 3-8x slower than separate
  ones, ``benchmarks/bench_compose.py``).
* ``form="extracted"``: physically pruned modules (``extract.extract_module``), different
  sizes. ``execution="vmap"``: every module of a structure group is zero-padded to the
  group's largest kept count per mask point (exact: padded channels are zero) and the stacked
  parameters run as one vmap; ``execution="unrolled"``: each module's own pruned graph
  (channel counts zero-padded to a multiple of ``align``), unrolled in the one jitted
  program (the CPU default, fastest there).

Groups of different architectures or widths are separate calls inside the same ``apply``.

**Concern-identification modules** (``ConcernModuleSet``, ResNets) always run as the base
model under their position maps (they have no pruned form: no weight is removed), one vmap
over modules per base model, and score by their positive-class probability. When every
module of a composition is of this kind, ``apply`` applies Pan & Rajan's voting rule (the
single positive module wins, else the most confident: ``concern.vote_scores``); mixed
compositions compare the probabilities with the other modules' sigmoid scores directly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .extract import effective_masks, extract_module, kept_indices
from .gradsplitter import GradSplitterConfig, masked_logits, resolve_chunk
from .heads import Heads, scores_from_logits
from .masks import mask_points
from .concern import module_logits, positive_probability, vote_scores
from .module_set import ConcernModuleSet, ModuleSet

__all__ = [
    "Pick",
    "ClassRef",
    "Composition",
    "MaskedGroup",
    "ExtractedGroup",
    "ConcernGroup",
    "compose",
    "apply",
    "predict_scores",
    "default_execution",
]

FORMS = ("masked", "extracted")
EXECUTIONS = ("auto", "vmap", "unrolled")
INPUTS = ("raw", "normalized")


class Pick(NamedTuple):
    """One module of a composition: module ``source_class`` of ``module_set``.

    ``source``: a label for reports (e.g. the module-set directory); ``name``: the composed
    class's name (default: the source's class name).
    """

    module_set: ModuleSet
    source_class: int
    source: str = ""
    name: str | None = None


class ClassRef(NamedTuple):
    """Where composed class k comes from: ``source`` (label), ``dataset``, ``source_class``
    (the class index in that source model) and ``name``."""

    source: str
    dataset: str
    source_class: int
    name: str


def default_execution() -> str:
    """``unrolled`` on the CPU backend, ``vmap`` on GPU/TPU (see the module docstring)."""
    return "unrolled" if jax.default_backend() == "cpu" else "vmap"


def _pytree(data, meta):
    def deco(cls):
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)

    return deco


@_pytree(["params", "masks", "heads", "classes", "mean", "std"],
         ["graphdef", "base_index", "execution", "chunk"])
@dataclasses.dataclass(frozen=True)
class MaskedGroup:
    """Modules run as masked forwards of base models with one structure.

    params: ``nnx.State`` of the M base models stacked on a leading axis [M, ...];
    masks: ``{point: float 0/1 [n, C]}`` (keep-one rule applied); heads: ``Heads`` [n, ...] or
    ``None``; classes: int32 [n] module class in its base model; mean/std: float32 [M, C];
    base_index: static tuple (n) of each module's base model.
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


@_pytree(["params", "heads", "classes", "mean", "std", "tails"], ["graphdefs", "execution", "tail_of"])
@dataclasses.dataclass(frozen=True)
class ExtractedGroup:
    """Physically pruned modules of one structure group.

    ``execution="unrolled"``: graphdefs/params hold one entry per module (own shapes);
    ``"vmap"``: one graphdef and params stacked [n, ...] (padded to common shapes).
    heads: ``Heads`` [n, ...] or ``None``; classes int32 [n]; mean/std float32 [n, C].
    tails: per distinct base model, the FC layers after the first ``((kernel, bias), ...)``;
    extraction copies them unchanged, so modules of one base share them: they run once on
    the stacked hidden activations of those modules (SimCNN's 4096x4096 layers are read
    once, not once per module). tail_of: static base index per module; ``()`` when the
    architecture has a single FC layer.
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


@_pytree(["params", "keep", "head_w", "head_b", "mean", "std"],
         ["graphdef", "base_index", "num_classes", "chunk"])
@dataclasses.dataclass(frozen=True)
class ConcernGroup:
    """Concern-identification modules of ResNets with one structure.

    params: the M base models' ``nnx.State`` stacked [M, ...]; keep: ``{node: float 0/1
    [n, H, W, C]}``; head_w [n, F, 2] / head_b [n, 2]: channeled output layers; mean/std
    float32 [M, C]; base_index: static base model per module; num_classes: the base models'
    class count (for the positive probability).
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


@_pytree(["groups"], ["order", "labels", "input", "in_channels", "form"])
@dataclasses.dataclass(frozen=True)
class Composition:
    """K composed modules. ``apply(comp, x)`` returns scores [B, K] in ``labels`` order.

    groups: ``MaskedGroup`` / ``ExtractedGroup`` pytrees; order: static permutation from the
    groups' concatenated columns to composed columns; labels: ``ClassRef`` per column.
    """

    groups: tuple
    order: tuple
    labels: tuple
    input: str
    in_channels: int
    form: str

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.labels]


# ------------------------------------------------------------------------------ building
def _structure_key(model) -> tuple:
    return (model.arch, model.width, model.num_classes, model.in_channels,
            getattr(model, "fc_hidden", None))


def _check_picks(picks: Sequence[Pick], input: str) -> None:
    if not picks:
        raise ValueError("compose needs at least one module")
    chans = {p.module_set.base.in_channels for p in picks}
    if len(chans) != 1:
        raise ValueError(f"modules expect different input channels {sorted(chans)}; "
                         "all modules of a composition must read the same images")
    for k, p in enumerate(picks):
        if not isinstance(p.module_set, (ModuleSet, ConcernModuleSet)):
            raise TypeError(f"pick {k}: expected a ModuleSet, got {type(p.module_set).__name__}")
        n = p.module_set.num_modules
        if not 0 <= int(p.source_class) < n:
            raise ValueError(f"pick {k} ({p.source or 'module set'}): unknown class index "
                             f"{p.source_class}; the module set has classes 0..{n - 1}")
        p.module_set.normalization  # noqa: B018 - raises when missing
    if input == "normalized":
        norms = {p.module_set.normalization for p in picks}
        if len(norms) > 1:
            raise ValueError(
                "modules come from models with different normalisation "
                f"{sorted(norms)}; use input='raw' (each module normalises raw pixels itself) "
                "or modules trained with the same statistics")


def _labels(picks: Sequence[Pick]) -> tuple:
    out = []
    for p in picks:
        meta = p.module_set.meta
        names = meta.get("class_names") or [str(i) for i in range(p.module_set.num_modules)]
        c = int(p.source_class)
        out.append(ClassRef(p.source, str(meta.get("dataset", "")), c, p.name or str(names[c])))
    return tuple(out)


def _norm_arrays(sets: Sequence[ModuleSet]) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray([ms.normalization[0] for ms in sets], jnp.float32)
    std = jnp.asarray([ms.normalization[1] for ms in sets], jnp.float32)
    return mean, std


def _stack_heads(heads_list) -> Heads | None:
    if heads_list[0] is None:
        return None
    return Heads(*(jnp.stack([jnp.asarray(h[j]) for h in heads_list]) for j in range(4)))


def _masked_group(picks, execution, chunk) -> MaskedGroup:
    sets, base_of = _distinct_bases(picks)
    bases = [ms.base for ms in sets]
    graphdef = nnx.graphdef(bases[0])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in bases])
    points = [pt.name for pt in mask_points(bases[0])]
    eff = [effective_masks({k: np.asarray(p.module_set.masks[k][p.source_class])[None] for k in points})
           for p in picks]
    masks = {k: jnp.asarray(np.concatenate([e[k] for e in eff])) for k in points}
    heads = _stack_heads([None if p.module_set.heads is None else
                          tuple(np.asarray(h)[p.source_class] for h in p.module_set.heads) for p in picks])
    mean, std = _norm_arrays(sets)
    chunk = chunk or resolve_chunk(GradSplitterConfig(), len(picks))
    return MaskedGroup(graphdef, params, masks, heads,
                       jnp.asarray([p.source_class for p in picks], jnp.int32), mean, std,
                       tuple(base_of), execution, int(chunk))


def _distinct_bases(picks):
    """(module sets with distinct base models, base index per pick)."""
    sets, base_of, ids = [], [], []
    for p in picks:
        if id(p.module_set.base) not in ids:
            sets.append(p.module_set)
            ids.append(id(p.module_set.base))
        base_of.append(ids.index(id(p.module_set.base)))
    return sets, base_of


def _concern_group(picks, chunk) -> ConcernGroup:
    sets, base_of = _distinct_bases(picks)
    bases = [ms.base for ms in sets]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in bases])
    keeps = [p.module_set.keep(p.source_class) for p in picks]
    keep = {k: jnp.asarray(np.stack([kp[k] for kp in keeps])) for k in keeps[0]}
    head_w = jnp.asarray(np.stack([p.module_set.head_w[p.source_class] for p in picks]))
    head_b = jnp.asarray(np.stack([p.module_set.head_b[p.source_class] for p in picks]))
    mean, std = _norm_arrays(sets)
    chunk = chunk or resolve_chunk(GradSplitterConfig(), len(picks))
    return ConcernGroup(nnx.graphdef(bases[0]), params, keep, head_w, head_b, mean, std,
                        tuple(base_of), int(bases[0].num_classes), int(chunk))


def _module_masks(p: Pick) -> dict:
    return {k: np.asarray(v[p.source_class]) for k, v in p.module_set.masks.items()}


def _module_head(p: Pick):
    if p.module_set.heads is None:
        return None
    return tuple(np.asarray(h)[p.source_class] for h in p.module_set.heads)


def _aligned(n: int, full: int, align: int) -> int:
    return min(full, -(-n // align) * align) if align > 1 else n


def _extracted_group(picks, execution, align) -> ExtractedGroup:
    kept = [kept_indices(p.module_set.base, _module_masks(p)) for p in picks]
    full = {pt.name: pt.size for pt in mask_points(picks[0].module_set.base)}
    if execution == "vmap":  # one common (aligned) shape for the whole group
        common = {k: _aligned(max(kp[k].size for kp in kept), full[k], align) for k in full}
        pads = [common] * len(picks)
    else:  # each module its own shape, channel counts rounded up to a multiple of `align`
        pads = [{k: _aligned(kp[k].size, full[k], align) for k in full} for kp in kept]
    mods = [extract_module(p.module_set.base, _module_masks(p), _module_head(p), p.source_class, pad)
            for p, pad in zip(picks, pads)]
    splits = [nnx.split(m.model) for m in mods]
    if execution == "vmap":
        graphdefs = (splits[0][0],)
        params = (jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in splits]),)
    else:
        graphdefs = tuple(g for g, _ in splits)
        params = tuple(s for _, s in splits)
    mean, std = _norm_arrays([p.module_set for p in picks])
    tails, tail_of = (), ()
    base = picks[0].module_set.base
    if len(base.fc_layers) > 1:
        ids = []
        for p in picks:
            if id(p.module_set.base) not in ids:
                ids.append(id(p.module_set.base))
        tail_of = tuple(ids.index(id(p.module_set.base)) for p in picks)
        by_id = {id(p.module_set.base): p.module_set.base for p in picks}
        tails = tuple(tuple((getattr(by_id[i], n).kernel[...], getattr(by_id[i], n).bias[...])
                            for n in base.fc_layers[1:]) for i in ids)
    return ExtractedGroup(graphdefs, params, _stack_heads([m.head for m in mods]),
                          jnp.asarray([p.source_class for p in picks], jnp.int32), mean, std,
                          tails, execution, tail_of)


def compose(
    picks: Sequence[Pick],
    *,
    form: str = "masked",
    execution: str = "auto",
    input: str = "raw",
    chunk: int | None = None,
    align: int = 8,
) -> Composition:
    """Compose ``picks`` (column k = ``picks[k]``) into a ``Composition``.

    Args:
      form: ``"masked"`` (base model + masks) or ``"extracted"`` (pruned modules).
      execution: ``"vmap"``, ``"unrolled"`` or ``"auto"`` (``default_execution()``).
      input: ``"raw"`` pixels in [0, 255] or ``"normalized"`` images (one shared normalisation).
      chunk: masked modules of one base model per vmapped group (default: 2 on CPU, all else).
      align: extracted modules' kept channel counts are zero-padded up to a multiple of this
        (exact; measured ~18% faster on XLA:CPU with 8 than with ragged counts); 1 = no padding.

    Raises:
      ValueError: empty picks, unknown class index, different input channels, or different
        normalisations with ``input="normalized"``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
    _check_picks(picks, input)
    execution = default_execution() if execution == "auto" else execution
    groups_idx: dict[tuple, list[int]] = {}
    for k, p in enumerate(picks):
        concern = isinstance(p.module_set, ConcernModuleSet)
        groups_idx.setdefault((concern, *_structure_key(p.module_set.base)), []).append(k)
    groups, cols = [], []
    for (concern, *_), idx in groups_idx.items():
        gp = [picks[k] for k in idx]
        if concern:
            groups.append(_concern_group(gp, chunk))
        else:
            groups.append(_masked_group(gp, execution, chunk) if form == "masked"
                          else _extracted_group(gp, execution, align))
        cols.extend(idx)
    order = tuple(int(i) for i in np.argsort(cols))
    return Composition(tuple(groups), order, _labels(picks), input,
                       picks[0].module_set.base.in_channels, form)


# ------------------------------------------------------------------------------ running
def _prep(x, mean, std, input):
    x = x.astype(jnp.float32)
    return (x / 255.0 - mean) / std if input == "raw" else x


def _masked_logits(g: MaskedGroup, x, input) -> jax.Array:
    """[B, n, K] logits of a masked group."""
    n = len(g.base_index)
    n_bases = g.mean.shape[0]

    def run_base(b, masks_b):
        params = jax.tree.map(lambda a: a[b], g.params)
        model = nnx.merge(g.graphdef, params)
        return masked_logits(model, masks_b, _prep(x, g.mean[b], g.std[b], input), g.chunk)

    if n_bases == 1 or g.execution == "unrolled":
        outs, cols = [], []
        for b in range(n_bases):
            idx = [i for i in range(n) if g.base_index[i] == b]
            outs.append(run_base(b, {k: v[np.asarray(idx)] for k, v in g.masks.items()}))
            cols.extend(idx)
        logits = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
        logits = logits[np.argsort(cols)] if cols != list(range(n)) else logits
    else:  # one vmap over modules with their base model's parameters gathered per module
        bi = np.asarray(g.base_index)
        params = jax.tree.map(lambda a: a[bi], g.params)

        def one(p, mk, mean, std):
            return nnx.merge(g.graphdef, p)(_prep(x, mean, std, input), mk)

        logits = jax.vmap(one)(params, g.masks, g.mean[bi], g.std[bi])
    return jnp.swapaxes(logits, 0, 1)


def _tail(h, layers):
    for j, (w, b) in enumerate(layers):
        h = h @ w + b
        if j < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def _extracted_logits(g: ExtractedGroup, x, input) -> jax.Array:
    """[B, n, K] logits of an extracted group."""
    stop = 1 if g.tails else None  # with shared tails: modules run up to their first FC

    def run(model, i_or_mean, std=None):
        mean, std = (g.mean[i_or_mean], g.std[i_or_mean]) if std is None else (i_or_mean, std)
        return model.fc_chain(model.features(_prep(x, mean, std, input)), 0, stop)

    if g.execution == "vmap":
        h = jax.vmap(lambda p, m, s: run(nnx.merge(g.graphdefs[0], p), m, s))(g.params[0], g.mean, g.std)
    else:
        h = jnp.stack([run(nnx.merge(gd, p), i) for i, (gd, p) in enumerate(zip(g.graphdefs, g.params))])
    if not g.tails:
        return jnp.swapaxes(h, 0, 1)
    n, b = h.shape[:2]
    outs, cols = [], []
    for t, layers in enumerate(g.tails):  # one matmul chain per base model
        idx = [i for i in range(n) if g.tail_of[i] == t]
        ht = h[np.asarray(idx)].reshape(len(idx) * b, -1)
        outs.append(_tail(ht, layers).reshape(len(idx), b, -1))
        cols.extend(idx)
    logits = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
    if cols != list(range(n)):
        logits = logits[np.argsort(cols)]
    return jnp.swapaxes(logits, 0, 1)


def _concern_logits(g: ConcernGroup, x, input) -> jax.Array:
    """[B, n, 2] binary logits of a concern group (one vmap per base model)."""
    n = len(g.base_index)
    outs, cols = [], []
    for b in range(g.mean.shape[0]):
        idx = np.asarray([i for i in range(n) if g.base_index[i] == b])
        model = nnx.merge(g.graphdef, jax.tree.map(lambda a: a[b], g.params))
        xb = _prep(x, g.mean[b], g.std[b], input)
        outs.append(module_logits(model, {k: v[idx] for k, v in g.keep.items()},
                                  g.head_w[idx], g.head_b[idx], xb, g.chunk))
        cols.extend(idx.tolist())
    logits = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return logits[:, np.argsort(cols)] if cols != list(range(n)) else logits


def _check_images(comp: Composition, x) -> None:
    want = (32, 32, comp.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"the composition expects images [B, 32, 32, {comp.in_channels}] (NHWC), "
                         f"got shape {tuple(x.shape)}")


def apply(comp: Composition, x: jax.Array) -> jax.Array:
    """Scores [B, K] of the K composed modules for images x [B, 32, 32, C].

    Pure and jit/vmap-safe; predictions are ``argmax(-1)`` (indices into ``comp.labels``).
    """
    _check_images(comp, x)
    cols, positive = [], []
    for g in comp.groups:
        if isinstance(g, ConcernGroup):
            l2 = _concern_logits(g, x, comp.input)
            cols.append(positive_probability(l2, g.num_classes))
            positive.append(l2[..., 0] > l2[..., 1])
            continue
        if isinstance(g, MaskedGroup):
            feats = _masked_logits(g, x, comp.input)
        else:
            feats = _extracted_logits(g, x, comp.input)
        cols.append(scores_from_logits(g.heads, g.classes, feats))
    s = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
    if len(positive) == len(comp.groups):  # all concern modules: the voting rule
        s = vote_scores(s, jnp.concatenate(positive, axis=-1))
    return s[:, np.asarray(comp.order)] if comp.order != tuple(range(len(comp.order))) else s


_apply_jit = jax.jit(apply)


def predict_scores(comp: Composition, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores [n, K] for a NumPy array of images (batched; last batch padded to a full one
    so a single shape is compiled)."""
    x = np.asarray(x)
    _check_images(comp, x)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        n = len(xb)
        if n < batch_size and len(x) > batch_size:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - n, 0)])
        out.append(np.asarray(_apply_jit(comp, jnp.asarray(xb)))[:n])
    return np.concatenate(out) if out else np.zeros((0, comp.num_classes), np.float32)
