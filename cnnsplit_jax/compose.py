"""Compose modules from one or many module sets into one classifier: a pytree + ``apply``.

A ``Composition`` holds K modules (one per output column) and is a JAX pytree, so
``apply(comp, x) -> scores [B, K]`` can be jitted, vmapped or embedded in other code::

    comp = compose([Pick(ms_a, 0), Pick(ms_b, 3), Pick(ms_c, 1)])   # K = 3 columns
    scores = jax.jit(apply)(comp, x_uint8)                          # [B, 3]
    pred = scores.argmax(-1)                                        # composed label

Column k is module ``picks[k].source_class`` of ``picks[k].module_set``; ``comp.labels`` maps
each composed class to its source explicitly (``ClassRef``). As in the papers, scores of
different modules are compared directly (no calibration): head sigmoids for GradSplitter
module sets, class logits for module sets without heads, positive-class probabilities for
concern modules. When every module is of a kind with its own rule (concern: Pan & Rajan's
vote), ``apply`` applies it.

**Inputs.** ``input="raw"`` (default): uint8 images with pixel values in [0, 255]
``[B, 32, 32, C]`` (float images are refused: convert them with ``data.to_uint8``, which
checks their range); every module normalises them with its own base model's statistics, so
modules of models trained on different datasets compose correctly. ``input="normalized"``:
already-normalised images; all sources must then share one normalisation (else ValueError).

**Execution.** Modules are grouped by kind and base-model structure; every group is one
``modules.forward`` call inside the one traced ``apply`` (no host loop). ``form="masked"``:
modules run as the base model under their masks (vmapped, in groups of ``chunk`` on the
CPU); modules of several base models with one structure stack those models' parameters:
``execution="vmap"`` runs one vmap over per-module gathered parameters (one batched/grouped
convolution per layer: the accelerator default); ``"unrolled"`` one vmap per base model (the
CPU default: XLA:CPU's grouped convolutions are 3-8x slower than separate ones,
``benchmarks/bench_compose.py``). ``form="extracted"``: physically pruned modules (zero-padded
to a common shape under ``"vmap"``; each its own graph, channel counts aligned to ``align``,
under ``"unrolled"``). Concern modules always run as their base model under their position
maps (they have no pruned form).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from . import mesh as meshlib
from .data import map_batches
from .modules.forward import INPUTS, FORWARD_FORMS, Pick, group_outputs

__all__ = ["Pick", "ClassRef", "Composition", "compose", "apply", "predict_scores", "default_execution",
           "FORMS", "EXECUTIONS"]

FORMS = ("masked", "extracted")
EXECUTIONS = ("auto", "vmap", "unrolled")


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


@functools.partial(jax.tree_util.register_dataclass, data_fields=["groups"],
                   meta_fields=["order", "labels", "input", "image_shape", "form", "mesh"])
@dataclasses.dataclass(frozen=True)
class Composition:
    """K composed modules. ``apply(comp, x)`` returns scores [B, K] in ``labels`` order.

    groups: ``modules.forward`` group pytrees; order: static permutation from the groups'
    concatenated columns to composed columns; labels: ``ClassRef`` per column; input: ``raw``
    or ``normalized``; image_shape: (H, W, C) of one image; form: ``masked`` or ``extracted``;
    mesh: a ``jax.sharding.Mesh`` whose ``data`` axis splits every batch ``apply`` gets (None:
    one device).
    """

    groups: tuple
    order: tuple
    labels: tuple
    input: str
    image_shape: tuple
    form: str
    mesh: object = None

    @property
    def in_channels(self) -> int:
        return int(self.image_shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.labels]


def _frozen(v):
    return tuple(_frozen(i) for i in v) if isinstance(v, (list, tuple)) else v


def _structure_key(model) -> tuple:
    return tuple(sorted((k, _frozen(v)) for k, v in model.config().items()))


def _check_picks(picks: Sequence[Pick], input: str) -> None:
    if not picks:
        raise ValueError("compose needs at least one module")
    shapes = {tuple(p.module_set.base.input_shape) for p in picks}
    if len(shapes) != 1:
        raise ValueError(f"modules expect different image shapes (H, W, C) {sorted(shapes)}; "
                         "all modules of a composition must read the same images")
    for k, p in enumerate(picks):
        if not hasattr(p.module_set, "forward_form"):
            raise TypeError(f"pick {k}: expected a module set, got {type(p.module_set).__name__}")
        n = p.module_set.num_modules
        if not 0 <= int(p.source_class) < n:
            raise ValueError(f"pick {k} ({p.source or 'module set'}): unknown class index "
                             f"{p.source_class}; the module set has classes 0..{n - 1}")
        p.module_set.normalization  # noqa: B018 - raises when missing
    seen: dict = {}
    for k, p in enumerate(picks):
        j = seen.setdefault((id(p.module_set), int(p.source_class)), k)
        if j != k:
            raise ValueError(f"picks {j} and {k} are the same module (class {int(p.source_class)} of one module set): "
                             "a composition's classes must be distinct")
    if input == "normalized":
        norms = {p.module_set.normalization for p in picks}
        if len(norms) > 1:
            raise ValueError(
                "modules come from models with different normalisation "
                f"{sorted(norms)}; use input='raw' (each module normalises raw pixels itself) "
                "or modules trained with the same statistics")


def _labels(picks: Sequence[Pick]) -> tuple:
    return tuple(ClassRef(p.source, str(p.module_set.meta.get("dataset", "")), int(p.source_class),
                          p.name or p.module_set.class_names[int(p.source_class)]) for p in picks)


def compose(
    picks: Sequence[Pick],
    *,
    form: str = "masked",
    execution: str = "auto",
    input: str = "raw",
    chunk: int | None = None,
    align: int = 8,
    mesh=None,
) -> Composition:
    """Compose ``picks`` (column k = ``picks[k]``) into a ``Composition``.

    Args:
      form: ``"masked"`` (base model + masks) or ``"extracted"`` (pruned modules).
      execution: ``"vmap"``, ``"unrolled"`` or ``"auto"`` (``default_execution()``).
      input: ``"raw"`` uint8 pixels in [0, 255] or ``"normalized"`` float images (one shared
        normalisation).
      chunk: masked modules of one base model per vmapped group (default: 2 on CPU, all else).
      align: extracted modules' kept channel counts are zero-padded up to a multiple of this
        (exact; measured ~18% faster on XLA:CPU with 8 than with ragged counts); 1 = no padding.
      mesh: devices the batch is split over (``mesh.make_mesh`` spec, axis ``data``, or a
        ``Mesh``); None: every local device. ``apply`` is called as before: it pads a batch to
        the axis, splits it, and returns the real rows.

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
        fwd = p.module_set.forward_form(form)
        key = (fwd, _structure_key(p.module_set.base), p.module_set.stack_key())
        groups_idx.setdefault(key, []).append(k)
    groups, cols = [], []
    for (fwd, *_), idx in groups_idx.items():
        groups.append(FORWARD_FORMS[fwd].stack([picks[k] for k in idx], execution=execution, chunk=chunk, align=align))
        cols.extend(idx)
    order = tuple(int(i) for i in np.argsort(cols))
    return Composition(tuple(groups), order, _labels(picks), input, tuple(picks[0].module_set.base.input_shape), form,
                       meshlib.resolve_data(mesh))


def _check_images(comp: Composition, x) -> None:
    want = tuple(comp.image_shape)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"the composition expects images [B, {', '.join(map(str, want))}] (NHWC), "
                         f"got shape {tuple(x.shape)}")


def apply(comp: Composition, x: jax.Array) -> jax.Array:
    """Scores [B, K] of the K composed modules for images x [B, H, W, C] (``comp.image_shape``).

    Pure and jit/vmap-safe; predictions are ``argmax(-1)`` (indices into ``comp.labels``).
    """
    _check_images(comp, x)
    b = x.shape[0]
    if comp.mesh is not None:  # pad the batch to the data axis (copies of image 0), split it
        pad = (-b) % meshlib.axis_size(comp.mesh, "data")
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, 0)]) if pad else x
        x = jax.lax.with_sharding_constraint(x, NamedSharding(comp.mesh, PartitionSpec("data")))
    outs = [group_outputs(g, x, comp.input) for g in comp.groups]
    cat = lambda parts: jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]  # noqa: E731
    s = cat([o[0] for o in outs])
    rules = {FORWARD_FORMS[g.form].combine for g in comp.groups}
    if len(rules) == 1 and None not in rules:  # every module of one kind with its own rule
        s = rules.pop()(s, cat([o[1] for o in outs]))
    s = s[:, np.asarray(comp.order)] if comp.order != tuple(range(len(comp.order))) else s
    if comp.mesh is not None:  # the real rows; split like the batch when nothing was padded
        s = s[:b] if s.shape[0] != b else jax.lax.with_sharding_constraint(
            s, NamedSharding(comp.mesh, PartitionSpec("data")))
    return s


_apply_jit = jax.jit(apply)


def predict_scores(comp: Composition, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores [n, K] for a NumPy array of images (padded batches: one compiled shape)."""
    x = np.asarray(x)
    _check_images(comp, x)
    return map_batches(lambda xb: _apply_jit(comp, jnp.asarray(xb)), [x], batch_size)
