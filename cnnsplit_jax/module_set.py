"""A saved set of modules: base model + per-module masks (and heads) + metadata.

Directory layout (``save_module_set``)::

    MOD_DIR/modules.json   method, arch, classes, dataset, normalisation, selected epoch, ...
    MOD_DIR/base/          copy of the base model (``checkpoint.save_model``): self-contained
    MOD_DIR/modules/       Orbax tree {"masks": {point: float 0/1 [N, C]}, "heads": Heads}
                           ("heads" absent for module sets scored by class logits)

Concern-identification module sets (``ConcernModuleSet``, method ``"concern"``) keep the
same layout; their ``modules/`` tree is {"inactive": {node: uint8 0/1 [N, H, W, C]},
"head_w": [N, F, 2], "head_b": [N, 2], "removed": uint8 [N, F]}. ``load_module_set``
returns the right class from ``modules.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .heads import Heads
from .masks import mask_points
from .models import MaskedCNN

__all__ = ["ModuleSet", "ConcernModuleSet", "save_module_set", "load_module_set"]


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


@dataclasses.dataclass
class ConcernModuleSet:
    """N binary modules of one ResNet by concern identification (``cnnsplit_jax.concern``).

    base: the trained ``ResNet``; inactive: ``{node: bool [N, H, W, C]}`` deactivated
    positions; head_w [N, F, 2] / head_b [N, 2]: channeled output layers (concerned,
    unconcerned); removed: bool [N, F] pooled features removed by MC-BLN; meta as ModuleSet.
    ``heads`` is ``None`` (modules are scored by their positive-class probability).
    """

    base: MaskedCNN
    inactive: dict
    head_w: np.ndarray
    head_b: np.ndarray
    removed: np.ndarray
    meta: dict
    heads = None

    num_modules = ModuleSet.num_modules
    normalization = ModuleSet.normalization

    @property
    def masks(self) -> dict:  # the first axis gives num_modules (as ModuleSet.masks)
        return self.inactive

    def keep(self, index=slice(None)) -> dict:
        """float32 ``{node: [.., H, W, C]}`` multipliers (1 kept, 0 deactivated)."""
        return {k: 1.0 - np.asarray(v[index], np.float32) for k, v in self.inactive.items()}

    def __post_init__(self):
        nodes = getattr(self.base, "nodes", None)
        if nodes is None:
            raise ValueError(f"concern module sets need a ResNet base model, got {self.base.arch!r}")
        shapes = {nd.name: nd.shape for nd in nodes()}
        if set(shapes) != set(self.inactive):
            raise ValueError(f"node maps {sorted(self.inactive)} do not match the model's nodes {sorted(shapes)}")
        n = {v.shape[0] for v in self.inactive.values()} | {self.head_w.shape[0], self.head_b.shape[0]}
        if len(n) != 1:
            raise ValueError(f"node maps and heads disagree on the number of modules: {sorted(n)}")
        for k, v in self.inactive.items():
            if tuple(v.shape[1:]) != shapes[k]:
                raise ValueError(f"node map {k!r} has shape {v.shape}, expected (N, {shapes[k]})")
        f = self.base.fc_in
        if self.head_w.shape[1:] != (f, 2) or self.head_b.shape[1:] != (2,):
            raise ValueError(f"channeled heads must be [N, {f}, 2] and [N, 2], got "
                             f"{self.head_w.shape} and {self.head_b.shape}")


def _save_base(out: Path, ms) -> None:
    ckpt.save_model(out / "base", ms.base, {k: ms.meta[k] for k in ("dataset", "normalization", "class_names") if k in ms.meta})


def save_module_set(out_dir: str | Path, ms: ModuleSet | ConcernModuleSet) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_base(out, ms)
    common = {"num_modules": ms.num_modules, "arch": ms.base.arch, "width": ms.base.width}
    if isinstance(ms, ConcernModuleSet):
        tree = {"inactive": {k: np.asarray(v, np.uint8) for k, v in ms.inactive.items()},
                "head_w": np.asarray(ms.head_w, np.float32), "head_b": np.asarray(ms.head_b, np.float32),
                "removed": np.asarray(ms.removed, np.uint8)}
        ckpt.save_tree(out / "modules", tree)
        ckpt.write_json(out / "modules.json", {**ms.meta, **common, "method": "concern", "heads": False})
        return
    tree = {"masks": {k: np.asarray(v, np.float32) for k, v in ms.masks.items()}}
    if ms.heads is not None:
        tree["heads"] = tuple(np.asarray(h, np.float32) for h in ms.heads)
    ckpt.save_tree(out / "modules", tree)
    ckpt.write_json(out / "modules.json", {**ms.meta, **common, "heads": ms.heads is not None})


def load_module_set(mod_dir: str | Path) -> ModuleSet:
    """Load a module set written by ``save_module_set`` (e.g. by ``cnnsplit split``)."""
    mod_dir = Path(mod_dir)
    if not (mod_dir / "modules.json").is_file():
        raise ckpt.CheckpointError(f"no module set in {mod_dir} (expected modules.json from `cnnsplit split`)")
    meta = ckpt.read_json(mod_dir / "modules.json")
    base, _ = ckpt.load_model(mod_dir / "base")
    n = int(meta["num_modules"])
    k = base.num_classes
    if meta.get("method") == "concern":
        if not hasattr(base, "nodes"):
            raise ckpt.CheckpointError(f"{mod_dir}: a concern module set needs a ResNet base, found {base.arch!r}")
        f = base.fc_in
        template = {"inactive": {nd.name: np.zeros((n, *nd.shape), np.uint8) for nd in base.nodes()},
                    "head_w": np.zeros((n, f, 2), np.float32), "head_b": np.zeros((n, 2), np.float32),
                    "removed": np.zeros((n, f), np.uint8)}
        tree = ckpt.load_tree(mod_dir / "modules", template)
        return ConcernModuleSet(base, {k2: np.asarray(v).astype(bool) for k2, v in tree["inactive"].items()},
                                np.asarray(tree["head_w"]), np.asarray(tree["head_b"]),
                                np.asarray(tree["removed"]).astype(bool), meta)
    template = {"masks": {p.name: np.zeros((n, p.size), np.float32) for p in mask_points(base)}}
    if meta.get("heads", True):
        template["heads"] = (np.zeros((n, k, 10), np.float32), np.zeros((n, 10), np.float32),
                             np.zeros((n, 10), np.float32), np.zeros((n,), np.float32))
    tree = ckpt.load_tree(mod_dir / "modules", template)
    masks = {k2: np.asarray(v) for k2, v in tree["masks"].items()}
    heads = Heads(*(np.asarray(h) for h in tree["heads"])) if "heads" in tree else None
    return ModuleSet(base, masks, heads, meta)
