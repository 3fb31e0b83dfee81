"""MwT's modularization as a method of the registry: a modularly trained model (``training``)
and its generators -> a ``ModuleSet`` of per-class kernel masks (spec mwt.md, "Modularization").

``split(key, model, data, cfg, *, generators)`` records every training image's binary masks
(generator output > 0, eval mode) at every generated conv layer, forms per-layer module masks
by the frequency threshold (``modularize``; retention, cohesion and coupling over these, as the
reference), and returns them as a ``ModuleSet`` with no heads: module c is the base model
under its kernel masks, scored by logit c, as CNNSplitter's. A layer without a generator (the
conv reading the image) keeps every kernel, as the reference's. A mask point gating a tied
pair (ResCNN's residual pairs, whose outputs are summed) keeps the union of its two layers'
kernels, the channels the reference's module keeps for the sum; its layers then keep more
kernels than their own masks, so the module set's retention is >= the per-layer one.

The modules run **without** the generators (the reference's ``keep_generator=False``): a
module is the plain model with kernels removed, which the reference fine-tunes before reuse
(``reuse``). Run without its generators, the trained model itself is a different model; the
report gives both accuracies so that nobody mistakes one for the other.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ...data import Normalization, map_batches, normalize
from ...train import accuracy, objective_accuracy
from ...validate import at_least, finite
from ..base import SplitData, SplitResult, check_data
from .generators import generator_layers, sample_gates
from .training import MwTObjective
from .modularize import (class_frequencies, kernel_retention, module_cohesion, module_coupling, module_masks,
                         pairwise_jaccard)

__all__ = ["MwTSplitConfig", "record_masks", "activation_cohesion", "split", "report", "summary_line"]


@dataclasses.dataclass(frozen=True)
class MwTSplitConfig:
    """threshold: a module keeps the kernels active for at least this fraction of its class's
    training images (0.9, the reference's); step: how far a layer's threshold is lowered when
    it would keep nothing; batch_size: images per recording batch; seed: unused by the pass
    itself (it is deterministic), kept as every method's config has one."""

    threshold: float = 0.9
    step: float = 0.05
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self):
        finite("threshold", self.threshold, lo=0.0, hi=1.0, strict=True)
        finite("step", self.step, lo=0.0, strict=True)
        at_least("batch_size", self.batch_size, 1)
        at_least("seed", self.seed, 0)


@jax.jit
def _masks_and_logits(model, gens, x_u8, mean, std):
    gates = sample_gates(gens)
    logits = model(normalize(x_u8, mean, std), gates)
    return {"masks": {p: gates.masks[p] > 0 for p in gens}, "logits": logits}


def record_masks(model, gens: dict, x_u8: np.ndarray, norm, batch_size: int = 512):
    """(layers, binary, logits): the generated conv layers in ``model.topology`` order, per
    layer bool [n, C] (generator mask > 0, eval mode) of images x_u8 [n, H, W, C] (uint8), and
    the logits [n, K] of the model run with its generators."""
    mean, std = (jnp.asarray(v) for v in norm)
    order = [s.name for s in model.topology if s.name in gens]
    out = map_batches(lambda xb: _masks_and_logits(model, gens, jnp.asarray(xb), mean, std), [x_u8], batch_size)
    return order, [np.asarray(out["masks"][n], bool) for n in order], np.asarray(out["logits"])


@jax.jit
def _active_kernels(model, masks, x_u8, mean, std):
    maps = model.kernel_maps(normalize(x_u8, mean, std), masks)
    return {p: m.mean(axis=(1, 2)) > 0 for p, m in maps.items()}


def activation_cohesion(module_set, x_u8: np.ndarray, y: np.ndarray, norm=None, batch_size: int = 512):
    """MwT's cohesion of modules formed after training, as the reference measures CNNSplitter's
    (``exp_cnnsplitter_reusing/calculate_cohesion.py``): per class c, module c (the base model
    under its masks) runs on the class-c images of ``x_u8`` [n, H, W, C] (uint8, labels ``y``);
    a kernel is active for an image when its output after the ReLU, averaged over positions,
    is > 0; cohesion is ``pairwise_jaccard`` of the images' active kernels (a removed kernel
    outputs 0, so it counts in no pair). Returns (mean over the classes with >= 2 images, per
    class; NaN for the others). ``norm``: anything ``Normalization.of`` reads (default: the
    module set's).

    One difference: the reference hooks each conv's own output (its CNNSplitter models have no
    BatchNorm); here it is each mask point's output after its BatchNorm and ReLU
    (``kernel_maps``), what the next layer reads; the same for models without BatchNorm."""
    mean, std = (jnp.asarray(v) for v in Normalization.of(module_set.normalization if norm is None else norm))
    y = np.asarray(y)
    per = []
    for c in range(module_set.num_modules):
        xc = x_u8[y == c]
        if len(xc) < 2:
            per.append(float("nan"))
            continue
        masks = {p: jnp.asarray(np.asarray(v)[c]) for p, v in module_set.masks.items()}
        out = map_batches(lambda xb: _active_kernels(module_set.base, masks, jnp.asarray(xb), mean, std), [xc],
                          batch_size)
        per.append(pairwise_jaccard(np.concatenate([np.asarray(out[p]) for p in sorted(out)], axis=1)))
    return float(np.nanmean(per)) if not np.isnan(per).all() else float("nan"), per


def split(key: jax.Array, model, data: SplitData, cfg: MwTSplitConfig = MwTSplitConfig(), *, generators: dict,
          ckpt_dir=None, resume: bool = False, callbacks=None, mesh=None) -> SplitResult:
    """Modularize ``model`` trained with its ``generators`` (``training.load_generators``) on
    ``data.x_train``; one deterministic pass (``key``, ``ckpt_dir``, ``resume``, ``callbacks``
    and ``mesh`` are accepted for the common entry point and unused). ``details``: the
    generated layers, per-class thresholds [N, L] and the modularity metrics."""
    del key, ckpt_dir, resume, callbacks, mesh
    from ...modules.module_set import ModuleSet

    check_data(data, model.num_classes)
    expected = set(generator_layers(model))  # refuses a model without a declared layer graph
    if set(generators) != expected:
        raise ValueError(f"generators for the layers {sorted(generators)}; {model.arch} has generated layers "
                         f"{sorted(expected)}")
    t0 = time.perf_counter()
    layers, binary, logits = record_masks(model, generators, data.x_train, data.normalization, cfg.batch_size)
    freqs = class_frequencies(binary, data.y_train, model.num_classes)
    masks, thresholds = module_masks(freqs, cfg.threshold, cfg.step)
    retention, per_module = kernel_retention(masks)
    cohesion, per_class = module_cohesion(binary, data.y_train, masks)
    coupling = module_coupling(masks)
    seconds = time.perf_counter() - t0
    n = model.num_classes
    per_layer, start = {}, 0
    for name, b in zip(layers, binary):
        per_layer[name] = masks[:, start:start + b.shape[1]]
        start += b.shape[1]
    full = {}
    for p in model.mask_points():
        if all(name in per_layer for name in p.layers):
            full[p.name] = np.logical_or.reduce([per_layer[name] for name in p.layers]).astype(np.float32)
        else:
            full[p.name] = np.ones((n, p.size), np.float32)
    metrics = {
        "kernel_retention": retention, "module_kernel_retention": per_module, "cohesion": cohesion,
        "class_cohesion": per_class, "coupling": coupling, "thresholds": thresholds.tolist(),
        "generated_layers": layers, "train_accuracy_with_generators": float((logits.argmax(-1) == data.y_train).mean()),
        "val_accuracy_with_generators": objective_accuracy(MwTObjective(), model, generators, data.x_val, data.y_val,
                                                           data.normalization, cfg.batch_size),
        "val_accuracy_without_generators": accuracy(model, data.x_val, data.y_val, data.normalization),
        "modularize_seconds": seconds}
    ms = ModuleSet(model, full, None, {"method": "mwt", "heads": False, "normalization": data.normalization.to_json(),
                                       "config": dataclasses.asdict(cfg), "generators": "dropped"})
    return SplitResult(ms, [metrics], seconds, {"metrics": metrics})


def report(result: SplitResult, data: SplitData) -> dict:
    """MwT's fields of ``split.json``: retention (over the generated layers, the reference's
    definition), cohesion, coupling, thresholds, and the model's accuracy with and without
    its generators."""
    del data
    return {"mwt": result.details["metrics"], "modularize_seconds": result.details["metrics"]["modularize_seconds"]}


def summary_line(report: dict) -> str:
    """One line under the module table: the modularity metrics and the generator gap."""
    m = report["mwt"]
    return (f"MwT: kernel retention {m['kernel_retention']:.3f} (generated layers), cohesion {m['cohesion']:.3f}, "
            f"coupling {m['coupling']:.3f}; validation accuracy {m['val_accuracy_with_generators']:.4f} with "
            f"generators, {m['val_accuracy_without_generators']:.4f} without (the modules run without)")
