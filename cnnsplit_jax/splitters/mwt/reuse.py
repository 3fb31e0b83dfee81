"""MwT's sub-task reuse (spec mwt.md, "Reuse on a sub-task"): for target classes T, the union
of their modules' kernel masks, the physically extracted module (generators dropped), a new
head ``ReLU -> Linear(N -> |T|)`` after the base model's classifier, and fine-tuning of the
whole module with SGD Nesterov (lr 0.05, cosine over 2 x epochs, 10 epochs) keeping the best
epoch. The reference keeps the epoch of the best *test* accuracy; here the best epoch is chosen
on a validation split of the task's training images, and the test set is only measured.

The comparison the reference makes is ``restricted_accuracy``: the standard model, trained
normally, with its logits restricted to T.

Works for any ``ModuleSet`` of kernel masks (MwT's, GradSplitter's, CNNSplitter's): the same
head and fine-tuning put every method's modules on one footing. A user's adapted model, whose
graph is traced rather than declared, is fine-tuned under its fixed union mask
(``MaskedSubtaskModule``) instead of physically extracted first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
import numpy as np
from flax import nnx

from ... import checkpoint as ckpt
from ...data import Dataset, select_classes
from ...models import kept_kernels, total_kernels
from ...models.base import torch_uniform
from ...models.protocol import DECLARED_GRAPH, has
from ...modules.extract import extract_module
from ...train import FitResult, TrainConfig, fit, objective_accuracy, predict

__all__ = ["SUBTASK_RECIPE", "SubtaskHead", "MaskedSubtaskModule", "subtask_masks", "subtask_module",
           "fine_tune_subtask", "restricted_accuracy", "SubtaskResult", "save_subtask", "load_subtask",
           "subtask_logits", "HEAD_DIR"]

#: where a saved sub-task module keeps its head (beside ``model.json`` / ``model/``)
HEAD_DIR = "head"

#: the reference's fine-tuning of a sub-task module, as ``TrainConfig`` overrides
SUBTASK_RECIPE = {"epochs": 10, "lr": 0.05, "nesterov": True, "weight_decay": 0.0, "lr_milestones": (),
                  "lr_schedule": "cosine", "cosine_period": 2.0}


@dataclasses.dataclass(frozen=True)
class SubtaskHead:
    """The new head as a ``train.Objective``: logits ``relu(module(x)) @ w + b`` [B, |T|];
    ``w`` [N, |T|] and ``b`` start as PyTorch's ``nn.Linear`` default (U(+-1/sqrt(N)))."""

    num_classes: int

    @property
    def name(self) -> str:
        return f"subtask head of {self.num_classes} classes"

    def init(self, key, model):
        kw, kb = jax.random.split(key)
        n = model.num_classes
        return {"w": torch_uniform(kw, (n, self.num_classes), n), "b": torch_uniform(kb, (self.num_classes,), n)}

    def _out(self, extra, logits):
        return jax.nn.relu(logits) @ extra["w"] + extra["b"]

    def loss(self, model, extra, x, y, *, dropout_key, dropout: bool):
        out = self._out(extra, model(x, train=True, dropout_key=dropout_key, dropout=dropout))
        ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return ce, {"accuracy": jnp.mean(out.argmax(-1) == y)}

    def logits(self, model, extra, x):
        return self._out(extra, model(x))


def subtask_masks(module_set, classes: Sequence[int]) -> dict:
    """``{point: float32 [C]}``: the union (logical OR) of the masks of modules ``classes``."""
    classes = _classes(module_set, classes)
    return {k: (np.asarray(v)[classes] > 0).any(0).astype(np.float32) for k, v in module_set.masks.items()}


class MaskedSubtaskModule(nnx.Module):
    """The sub-task module of a user's adapted model: a copy of the model run under the fixed
    union mask ``masks`` ``{point: [C]}``. A masked kernel's output is 0, as if removed, and it
    gets no gradient, so fine-tuning trains the kept kernels (and the layers after them) as
    the physically smaller module would; ``modules.extract_adapted(m.base, m.masks)`` gives
    that module for inference once trained. ``m(x, train=..., dropout_key=...)``: logits
    [B, num_classes]; other masks are refused (these are fixed)."""

    def __init__(self, base, masks):
        self.base = base
        self._masks = tuple((k, tuple(float(v) for v in np.asarray(m))) for k, m in sorted(masks.items()))
        self.num_classes, self.in_channels, self.arch = base.num_classes, base.in_channels, base.arch

    @property
    def masks(self) -> dict:
        """``{point: float32 [C]}``: the fixed mask."""
        return {k: np.asarray(v, np.float32) for k, v in self._masks}

    def __call__(self, x, masks=None, *, train: bool = False, dropout_key=None, dropout: bool = True):
        if masks is not None:
            raise ValueError("a sub-task module runs under its own fixed mask; run module.base for other masks")
        return self.base(x, {k: jnp.asarray(v) for k, v in self._masks}, train=train, dropout_key=dropout_key,
                         dropout=dropout)

    def config(self) -> dict:
        """The base model's config and the fixed mask's kept channels (checkpoint identity)."""
        return {**self.base.config(), "fixed_masks": {k: [i for i, v in enumerate(m) if v > 0] for k, m in self._masks}}


def subtask_module(module_set, classes: Sequence[int]):
    """The module of ``classes`` and its kernel retention over all conv layers (kept / all;
    tied layers counted per layer). The module is physically extracted (a ``MaskedCNN`` with
    the kept kernels only, the base model's classifier kept whole) for a model that declares
    its graph, and a ``MaskedSubtaskModule`` (a copy under the fixed mask) for a user's model."""
    masks = subtask_masks(module_set, classes)
    if has(module_set.base, DECLARED_GRAPH):
        module = extract_module(module_set.base, masks, None, -1).model
    else:
        module = MaskedSubtaskModule(nnx.clone(module_set.base), masks)
    return module, float(kept_kernels(module_set.base, masks)) / total_kernels(module_set.base)


@dataclasses.dataclass
class SubtaskResult:
    """A fine-tuned sub-task module: ``fit``'s result (``model``, ``extra`` = the head, the
    best validation epoch and history), its test accuracy and kernel retention."""

    fit: FitResult
    head: SubtaskHead
    classes: list
    test_accuracy: float
    kernel_retention: float


def fine_tune_subtask(module_set, ds: Dataset, classes: Sequence[int], cfg: TrainConfig | None = None, *,
                      run_dir=None, resume: bool = False, callbacks=None) -> SubtaskResult:
    """Extract the module of ``classes`` from ``module_set``, append the new head, fine-tune it
    on ``ds``'s images of those classes (``cfg``: default ``SUBTASK_RECIPE``), and measure it
    on their test images. ``ds`` is the dataset the modules' base model was trained on."""
    classes = _classes(module_set, classes)
    cfg = cfg or TrainConfig(**SUBTASK_RECIPE)
    task = select_classes(ds, classes)
    module, retention = subtask_module(module_set, classes)
    head = SubtaskHead(len(classes))
    res = fit(module, task, cfg, run_dir=run_dir, resume=resume, callbacks=callbacks, objective=head,
              identity={"classes": classes})
    acc = objective_accuracy(head, res.model, res.extra, task.x_test, task.y_test, task.info)
    return SubtaskResult(res, head, classes, acc, retention)


def subtask_logits(model, head_params: dict, x, norm) -> np.ndarray:
    """Logits [B, |T|] of a sub-task module (``model``, the extracted module) with its head
    ``{"w": [N, |T|], "b": [|T|]}`` on raw images ``x`` normalised by ``norm``."""
    head = SubtaskHead(int(np.shape(head_params["b"])[0]))
    return np.asarray(head._out(head_params, jnp.asarray(predict(model, x, norm))))


def save_subtask(run_dir, result: SubtaskResult, meta: dict) -> None:
    """Write the fine-tuned module (``checkpoint.save_model``: ``load_model`` rebuilds it,
    pruned channels and all; a ``MaskedSubtaskModule``'s model, its fixed mask recorded) and
    its head (``run_dir/head``, checksummed); ``meta`` goes into ``model.json`` with the
    classes and the head's size."""
    head = {k: jnp.asarray(v, jnp.float32) for k, v in result.fit.extra.items()}
    ckpt.save_tree(Path(run_dir) / HEAD_DIR, head)
    model, rec = result.fit.model, {"classes": result.classes}
    if isinstance(model, MaskedSubtaskModule):
        model, rec = model.base, {**rec, "masks": {k: [int(v > 0) for v in m] for k, m in model.masks.items()}}
    ckpt.save_model(run_dir, model, {**meta, "subtask": rec})


def load_subtask(run_dir, *, trust_definition: bool | str = False) -> tuple:
    """``(module, head_params, meta)`` of a sub-task module saved by ``save_subtask``
    (``trust_definition``: as ``checkpoint.load_model``'s, for a user's model);
    ``CheckpointError`` when ``run_dir`` holds another model, a damaged head or a fixed mask
    that is not the model's."""
    module, meta = ckpt.load_model(run_dir, trust_definition=trust_definition)
    rec = meta.get("subtask")
    if not isinstance(rec, dict) or not isinstance(rec.get("classes"), list) or len(rec["classes"]) < 2:
        raise ckpt.CheckpointError(f"{run_dir} holds no sub-task module (no 'subtask' record in its model.json)")
    if "masks" in rec:
        module = MaskedSubtaskModule(module, _saved_masks(run_dir, module, rec["masks"]))
    k, n = len(rec["classes"]), module.num_classes
    template = {"w": jnp.zeros((n, k), jnp.float32), "b": jnp.zeros((k,), jnp.float32)}
    return module, ckpt.load_tree(Path(run_dir) / HEAD_DIR, template), meta


def restricted_accuracy(model, ds: Dataset, classes: Sequence[int], norm=None) -> float:
    """Test accuracy on ``classes`` of ``model`` (N classes) with its logits restricted to them."""
    task = select_classes(ds, classes)
    logits = np.asarray(predict(model, task.x_test, norm if norm is not None else ds.info))
    return float((logits[:, list(classes)].argmax(-1) == task.y_test).mean())


def _saved_masks(run_dir, model, saved) -> dict:
    sizes = {p.name: p.size for p in model.mask_points()}
    ok = isinstance(saved, dict) and set(saved) == set(sizes) and all(
        isinstance(v, list) and len(v) == sizes[k] and all(b in (0, 1) for b in v) for k, v in saved.items())
    if not ok:
        raise ckpt.CheckpointError(f"{run_dir}: the sub-task module's fixed mask is not one of 0/1 per kernel of the "
                                   f"model's mask points {sizes}")
    return {k: np.asarray(v, np.float32) for k, v in saved.items()}


def _classes(module_set, classes) -> list[int]:
    classes = [int(c) for c in classes]
    n = module_set.num_modules
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(0 <= c < n for c in classes):
        raise ValueError(f"a sub-task needs at least 2 distinct classes among 0..{n - 1}, got {classes}")
    return classes
