"""A saved set of modules: base model + per-module binary masks and heads + metadata.

Directory layout (``save_module_set``)::

    MOD_DIR/modules.json   method, arch, classes, dataset, normalisation, selected epoch, ...
    MOD_DIR/base/          copy of the base model (``checkpoint.save_model``): self-contained
    MOD_DIR/modules/       Orbax tree {"masks": {point: float 0/1 [N, C]}, "heads": Heads}
                           ("heads" absent for module sets scored by class logits)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .heads import Heads
from .masks import mask_points
from .models import MaskedCNN

__all__ = ["ModuleSet", "save_module_set", "load_module_set"]


@dataclasses.dataclass
class ModuleSet:
    """N modules of one base model.

    base: the trained model; masks: ``{point: float32 0/1 [N, C]}``; heads: stacked ``Heads``
    (GradSplitter) or ``None`` (module c is scored by its base model's logit c);
    meta: ``method``, ``dataset``, ``normalization`` {mean, std}, ``class_names``, ...
    """

    base: MaskedCNN
    masks: dict
    heads: Heads
    meta: dict

    @property
    def num_modules(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel the base model was trained with."""
        norm = self.meta.get("normalization")
        if not norm:
            raise ValueError("module set has no 'normalization' in its metadata")
        return tuple(map(float, norm["mean"])), tuple(map(float, norm["std"]))

    def __post_init__(self):
        points = {p.name: p.size for p in mask_points(self.base)}
        if set(points) != set(self.masks):
            raise ValueError(f"masks have points {sorted(self.masks)}, model has {sorted(points)}")
        n = {v.shape[0] for v in self.masks.values()}
        if len(n) != 1:
            raise ValueError(f"masks disagree on the number of modules: {sorted(n)}")
        for k, v in self.masks.items():
            if v.shape[1:] != (points[k],):
                raise ValueError(f"mask {k!r} has shape {v.shape}, expected (N, {points[k]})")
        if self.heads is not None and self.heads.w1.shape[0] != self.num_modules:
            raise ValueError(f"{self.heads.w1.shape[0]} heads for {self.num_modules} modules")


def save_module_set(out_dir: str | Path, ms: ModuleSet) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_model(out / "base", ms.base, {k: ms.meta[k] for k in ("dataset", "normalization", "class_names") if k in ms.meta})
    tree = {"masks": {k: np.asarray(v, np.float32) for k, v in ms.masks.items()}}
    if ms.heads is not None:
        tree["heads"] = tuple(np.asarray(h, np.float32) for h in ms.heads)
    ckpt.save_tree(out / "modules", tree)
    ckpt.write_json(out / "modules.json", {**ms.meta, "num_modules": ms.num_modules,
                                           "arch": ms.base.arch, "width": ms.base.width,
                                           "heads": ms.heads is not None})


def load_module_set(mod_dir: str | Path) -> ModuleSet:
    """Load a module set written by ``save_module_set`` (e.g. by ``cnnsplit split``)."""
    mod_dir = Path(mod_dir)
    if not (mod_dir / "modules.json").is_file():
        raise ckpt.CheckpointError(f"no module set in {mod_dir} (expected modules.json from `cnnsplit split`)")
    meta = ckpt.read_json(mod_dir / "modules.json")
    base, _ = ckpt.load_model(mod_dir / "base")
    n = int(meta["num_modules"])
    k = base.num_classes
    template = {"masks": {p.name: np.zeros((n, p.size), np.float32) for p in mask_points(base)}}
    if meta.get("heads", True):
        template["heads"] = (np.zeros((n, k, 10), np.float32), np.zeros((n, 10), np.float32),
                             np.zeros((n, 10), np.float32), np.zeros((n,), np.float32))
    tree = ckpt.load_tree(mod_dir / "modules", template)
    masks = {k2: np.asarray(v) for k2, v in tree["masks"].items()}
    heads = Heads(*(np.asarray(h) for h in tree["heads"])) if "heads" in tree else None
    return ModuleSet(base, masks, heads, meta)
