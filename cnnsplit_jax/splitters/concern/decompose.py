"""CNN decomposition by concern identification (Pan & Rajan, ICSE 2022), for ``ResNet``.

A module for class c is the trained model plus a map of *deactivated positions* per node
(``resnet.Node``: the pre-activations a ReLU reads, one per (row, col, channel)) and a binary
output layer. Nothing is trained and no weight is removed, so a module has as many
parameters as the model (the survey's "uncompressed" modules); ``ConcernModuleSet.structure``
reports this.

Steps (spec field-survey.md §1.3-1.5), all classes at once:

1. **Concern identification (CI)**: a position is deactivated for module c when its
   pre-activation is <= 0 for *every* concerned input (logical AND over inputs). The lab's
   concerned inputs: at most ``concerned_per_class`` (1000) class-c training inputs that the
   model predicts as c with probability > ``min_confidence`` (0.9), in a seeded random order.
2. **Tangling identification (TI)**: negative inputs (``negative_ratio`` x the concerned
   count, 1:1 as the paper, spread evenly over the other classes) restore every position
   they activate.
3. **Channeling**: the output layer becomes binary: the concerned column unchanged, the
   unconcerned column the mean of the other columns' weights and biases.
4. **Backtracking** (``backtrack``): MC-BLN with delta = 0.5: a pooled feature whose
   channeled edges meet ``bln_rule`` (default ``"listing"``: ``W[i, V_uc] <= -delta`` and
   ``W[i, V_c] >= delta``, the paper's Algorithm 2 as printed; or readings of its prose)
   serves only the unconcerned output and is removed: its row of the channeled head is
   zeroed and all its positions are deactivated in the nodes the average pool reads (the
   last Add, or the branch nodes it merges). MC-BI (``backtrack="bi"``: the paper's
   Algorithm 3; ``"bi_preserving"``: an output-preserving variant) then walks back to the
   input.

Vectorised over classes: each training input runs through the model once; a node is
active for a set of inputs when ``membership [N, B] @ (pre > 0) [B, P]`` is non-zero, one
matmul per node for all N modules (vs. a forward pass per class and input in the reference).

Residual blocks (``residual``): the paper's mapping (``"conv"``, default) keeps maps for conv
outputs only: conv2's output and a projection shortcut's are deactivated *before* the Add
where their value is <= 0 for every concerned input (a negative branch value that the Add
needed is then lost, which is the decomposition's cost); an identity shortcut always passes.
``"conv_identity"`` masks the identity input before the Add as well. ``"sum"`` deactivates
the sum at its ReLU instead, which never changes a concerned input's forward pass.

How a concern module scores and votes (the lab's K-column output ``[l_c, l_uc, 0, ..., 0]``:
score ``softmax(...)[0]``, positive when its argmax is l_c; one positive wins, several go to
the most confident positive, none to the most confident module) is the ``concern`` kind of
``modules.forward``.

Entry point: ``split(key, model, data, cfg)`` -> ``SplitResult`` with a ``ConcernModuleSet``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ... import checkpoint as ckpt
from ... import mesh as meshlib
from ...data import normalize, sum_batches
from ...models import SplittableModel
from ...models.protocol import POSITION_NODES, require
from ...models.resnet import DEFAULT_RESIDUAL
from ...modules.module_set import ConcernModuleSet
from ...progress import Progress, callbacks_of, notify
from ..base import SplitData, SplitResult, check_data
from .backtrack import apply_feature_removal, backtrack_bln, backtrack_input
from .config import ConcernConfig
from .inputs import confidence_filter, membership, sample_sets, unconfident_classes

__all__ = ["Decomposition", "activity_counts", "channel", "backtrack_bln", "backtrack_input", "decompose",
           "split", "report", "retangle", "energy_estimate"]


@dataclasses.dataclass
class Decomposition:
    """Result of ``decompose`` for N modules.

    inactive: ``{node: bool [N, H, W, C]}`` final deactivation maps (CI & TI, then backtracking);
    ci_inactive: the maps after CI alone; head_w [N, F, 2] / head_b [N, 2]: channeled output
    layers (column 0 concerned, 1 unconcerned); removed_features: bool [N, F] (MC-BLN);
    stats: counts and seconds.
    """

    inactive: dict
    ci_inactive: dict
    head_w: np.ndarray
    head_b: np.ndarray
    removed_features: np.ndarray
    stats: dict


def _check_model(model) -> None:
    require(model, POSITION_NODES, "concern identification",
            "resnet20/32/56, or your own model adapted with kind='node'")


@functools.partial(jax.jit, static_argnums=(0, 4))
def _counts(graphdef, state, x, mem, names):
    """x [B, ...] normalised; mem [B, G] -> {node: [G, P]} active-input counts for the nodes
    ``names`` (compiled once per model structure, shape and mapping)."""
    _, rec = nnx.merge(graphdef, state).node_forward(x, record=True)
    b = x.shape[0]
    return {k: mem.T @ (rec[k].reshape(b, -1) > 0).astype(jnp.float32) for k in names}


def activity_counts(
    model: SplittableModel,
    x_u8: np.ndarray,
    mean,
    std,
    mem: np.ndarray,
    *,
    batch_size: int = 256,
    residual: str = DEFAULT_RESIDUAL,
    callbacks=None,
    mesh=None,
) -> dict:
    """``{node: int32 [G, H, W, C]}``: for each of G input sets (rows of ``mem`` [G, n]) how
    many of its inputs make each position active (pre-activation > 0), for the nodes of the
    ``residual`` mapping (``ResNet.nodes``).

    Every image runs once; the count is one matmul per node per batch (padded rows have
    zero membership). Callbacks get ``Progress("batch", ...)`` per batch. mesh: each batch
    (images and their membership columns) is split over the ``data`` axis when it divides it;
    the counts' sum over the batch becomes a reduction across devices (exact: integer counts).
    """
    _check_model(model)
    n = len(x_u8)
    if mem.shape[1] != n:
        raise ValueError(f"membership has {mem.shape[1]} columns for {n} images")
    graphdef, state = nnx.split(model)
    shapes = {nd.name: nd.shape for nd in model.nodes(residual)}
    cbs = callbacks_of(callbacks)

    def batch(xb, mb, valid):
        xb, mb = meshlib.shard_batch((normalize(xb, mean, std), mb * valid[:, None]), mesh)
        return _counts(graphdef, state, xb, mb, tuple(shapes))

    total = sum_batches(batch, [x_u8, np.asarray(mem, np.float32).T], batch_size,
                        on_batch=lambda i, k: notify(cbs, Progress("batch", i - 1, k)))
    return {k: np.rint(v).reshape(mem.shape[0], *shapes[k]).astype(np.int32) for k, v in total.items()}


def channel(fc_w: np.ndarray, fc_b: np.ndarray, classes: Sequence[int] | None = None):
    """Binary output layers (concerned, unconcerned) of every module.

    fc_w [F, K], fc_b [K] -> head_w [N, F, 2], head_b [N, 2]: column 0 is the class's own
    column; column 1 the mean of the other K - 1 columns (weights and bias).
    """
    fc_w, fc_b = np.asarray(fc_w, np.float64), np.asarray(fc_b, np.float64)
    k = fc_w.shape[1]
    classes = list(range(k)) if classes is None else list(classes)
    if k < 2:
        raise ValueError("channeling needs at least 2 output classes")
    w_other = (fc_w.sum(1, keepdims=True) - fc_w) / (k - 1)  # [F, K]
    b_other = (fc_b.sum() - fc_b) / (k - 1)
    head_w = np.stack([np.stack([fc_w[:, c], w_other[:, c]], -1) for c in classes])
    head_b = np.stack([np.asarray([fc_b[c], b_other[c]]) for c in classes])
    return head_w.astype(np.float32), head_b.astype(np.float32)


def decompose(
    model: SplittableModel,
    x_train: np.ndarray,
    y_train: np.ndarray,
    mean,
    std,
    cfg: ConcernConfig = ConcernConfig(),
    *,
    key: jax.Array | None = None,
    callbacks=None,
    mesh=None,
) -> Decomposition:
    """Decompose ``model`` into one module per class from uint8 training images.

    Args:
      x_train: uint8 [n, 32, 32, C]; y_train: int [n] in [0, num_classes).
      mean, std: the model's input normalisation.
      key: ``jax.random`` key for negative sampling (default ``key(cfg.seed)``).
      mesh: devices the images are split over (``mesh.make_mesh`` spec, axis ``data``, or a
        ``Mesh``; None: every device on ``data``): the activity counts, where the time goes.
    """
    _check_model(model)
    y_train = np.asarray(y_train)
    if len(x_train) != len(y_train):
        raise ValueError(f"{len(x_train)} images but {len(y_train)} labels")
    k = model.num_classes
    if len(y_train) and (y_train.min() < 0 or y_train.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}); got [{y_train.min()}, {y_train.max()}]")
    key = jax.random.key(cfg.seed) if key is None else key
    t0 = time.perf_counter()
    confident = (None if cfg.min_confidence is None else
                 confidence_filter(model, x_train, y_train, mean, std, cfg.min_confidence, cfg.batch_size))
    concerned, negatives = sample_sets(y_train, k, cfg, key, confident)
    unconfident = unconfident_classes(concerned, confident)
    index = np.unique(np.concatenate(concerned + negatives))
    mem = np.concatenate([membership(concerned, index), membership(negatives, index)])
    mesh = meshlib.resolve_data(mesh)
    counts = activity_counts(model, x_train[index], mean, std, mem, batch_size=cfg.batch_size,
                             residual=cfg.residual, callbacks=callbacks, mesh=mesh)
    ci = {n: v[:k] == 0 for n, v in counts.items()}
    inactive = {n: ci[n] & (v[k:] == 0) for n, v in counts.items()}
    head_w, head_b = channel(model.fc.kernel[...], model.fc.bias[...])
    removed = (np.zeros(head_w.shape[:2], bool) if cfg.backtrack == "none"
               else backtrack_bln(head_w, cfg.delta, cfg.bln_rule))
    # a removed feature leaves the head; its positions are deactivated where the pool reads them
    # (under "conv" an identity shortcut still carries a value there, which the zero row drops)
    head_w = np.where(removed[..., None], 0.0, head_w).astype(np.float32)
    final = apply_feature_removal(model, inactive, removed, cfg.residual)
    bln_inactive = [int(sum(v[i].sum() for v in final.values())) for i in range(k)]
    if cfg.backtrack in ("bi", "bi_preserving"):
        final = backtrack_input(model, final, cfg.residual, "listing" if cfg.backtrack == "bi" else "preserving")
    seconds = time.perf_counter() - t0
    total = sum(nd.size for nd in model.nodes(cfg.residual))
    stats = {
        "seconds": seconds,
        "images_forwarded": int(len(index)),
        "concerned": [int(c.size) for c in concerned],
        "unconfident_classes": unconfident,
        "negatives": [int(c.size) for c in negatives],
        "positions": int(total),
        "ci_inactive": [int(sum(v[i].sum() for v in ci.values())) for i in range(k)],
        "ti_restored": [int(sum((ci[n][i] & ~inactive[n][i]).sum() for n in ci)) for i in range(k)],
        "bln_removed_features": removed.sum(1).astype(int).tolist(),
        "bi_deactivated": [int(sum(v[i].sum() for v in final.values())) - bln_inactive[i] for i in range(k)],
        "inactive": [int(sum(v[i].sum() for v in final.values())) for i in range(k)],
    }
    return Decomposition(final, ci, head_w, head_b, removed, stats)


def split(key: jax.Array, model: SplittableModel, data: SplitData, cfg: ConcernConfig = ConcernConfig(), *,
          ckpt_dir=None, resume: bool = False, callbacks=None, mesh=None) -> SplitResult:
    """Decompose ``model`` with the training split of ``data`` (one pass, nothing to checkpoint:
    ``ckpt_dir`` and ``resume`` are accepted for the common signature and ignored). ``mesh``:
    devices the images are split over (axis ``data``; see ``decompose``).

    Returns a ``ConcernModuleSet`` (meta ``method``, ``normalization``, ``config``), a
    one-record history (the decomposition's counts) and its seconds; details: the
    ``Decomposition``.
    """
    del ckpt_dir, resume
    check_data(data, model.num_classes)
    dec = decompose(model, data.x_train, data.y_train, data.mean, data.std, cfg, key=key, callbacks=callbacks,
                    mesh=mesh)
    norm = data.normalization.to_json()
    ms = ConcernModuleSet(model, dec.inactive, dec.head_w, dec.head_b, dec.removed_features,
                          {"method": "concern", "normalization": norm, "residual": cfg.residual,
                           "config": ckpt.config_json(cfg)})
    return SplitResult(ms, [dec.stats], dec.stats["seconds"], {"decomposition": dec})


def report(result: SplitResult, data: SplitData) -> dict:
    """Concern identification's fields of ``split.json``: the decomposition's counts and
    seconds, and the paper's energy estimate of that time."""
    stats = result.details["decomposition"].stats
    return {"decomposition": stats, "decomposition_seconds": stats["seconds"],
            "energy": energy_estimate(stats["seconds"])}


def retangle(
    model: SplittableModel,
    inactive: Mapping[str, np.ndarray],
    removed_features: np.ndarray,
    x_neg_u8: np.ndarray,
    mean,
    std,
    *,
    residual: str,
    batch_size: int = 256,
) -> dict:
    """Continuous learning (paper §"continuous learning"): re-run TI for modules with new
    negative inputs (e.g. another dataset's classes, raw uint8 images read with this model's
    normalisation), restoring every position they activate; MC-BLN removals stay.

    inactive: ``{node: bool [N, H, W, C]}`` of the ``residual`` mapping; removed_features:
    bool [N, F]. Returns the new ``{node: bool [N, H, W, C]}``.
    """
    if len(x_neg_u8) == 0:
        return dict(inactive)
    n = next(iter(inactive.values())).shape[0]
    counts = activity_counts(model, x_neg_u8, mean, std, np.ones((1, len(x_neg_u8)), np.float32),
                             batch_size=batch_size, residual=residual)
    new = {k: np.asarray(v) & (counts[k][0] == 0)[None] for k, v in inactive.items()}
    return apply_feature_removal(model, new, np.asarray(removed_features, bool).reshape(n, -1), residual)


def energy_estimate(seconds: float, cpu_watts: float = 65.0, dram_watts: float = 5.0,
                    gpu_watts: float = 0.0, gpus: int = 0) -> dict:
    """Pan & Rajan's energy / CO2e formula (after Strubell et al.): ``kWh = 1.58 * hours *
    (p_cpu + p_dram + gpus * p_gpu) / 1000`` (1.58 = datacentre PUE) and ``CO2e = 0.954 lbs
    per kWh``. The wattages are assumptions (defaults: a 65 W desktop CPU, 5 W DRAM, no GPU),
    not measurements; the paper measured them with Intel Power Gadget."""
    kwh = 1.58 * (seconds / 3600.0) * (cpu_watts + dram_watts + gpus * gpu_watts) / 1000.0
    return {"kwh": kwh, "co2e_lbs": 0.954 * kwh, "assumed_watts": {
        "cpu": cpu_watts, "dram": dram_watts, "gpu": gpu_watts, "gpus": gpus}}


def summary_line(report: dict) -> str:
    """One line under the module table of ``split.json``'s concern-identification fields."""
    return f"decomposed in {report['decomposition_seconds']:.1f} s"
