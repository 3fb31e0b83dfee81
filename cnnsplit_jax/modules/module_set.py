"""Saved sets of modules: a base model plus what makes each of its N modules.

Two kinds, one interface (``num_modules``, ``normalization``, ``class_names``, ``set_kind``,
``forward_form``, ``active_sets``, ``structure``, saving):

* ``ModuleSet`` (set kind ``"kernel"``, GradSplitter / CNNSplitter): per-module binary kernel
  masks and, for GradSplitter, per-module heads. Runs as the masked base model or as
  physically extracted modules (``forward_form("masked" | "extracted")``).
* ``ConcernModuleSet`` (set kind ``"concern"``, Pan & Rajan): per-module maps of deactivated
  ReLU-input positions of a ResNet and channeled 2-column output layers. Runs only as the
  base model under its maps (no weight is removed): every form resolves to ``"concern"``.

Directory layout (``save_module_set``)::

    MOD_DIR/modules.json   kind, method, arch, classes, dataset, normalisation, ...
    MOD_DIR/base/          copy of the base model (``checkpoint.save_model``): self-contained
    MOD_DIR/modules/       Orbax tree of the kind's arrays (``ModuleSet.tree``)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..data import Normalization
from ..models import count_params, flatten_masks, kept_kernels, mask_points, total_kernels
from ..models.protocol import SplittableModel
from ..models.resnet import RESIDUAL_MAPPINGS
from ..models.protocol import DECLARED_GRAPH, KERNEL_MASKS, POSITION_NODES, has, require
from ..models import effective_masks
from .extract import extract_all, forward_flops
from .extract_adapted import ExtractionError, adapted_flops, extract_adapted_all
from .heads import Heads
from .weight_jaccard import weight_jaccard

__all__ = ["ModuleSet", "ConcernModuleSet", "save_module_set", "load_module_set", "MODULE_SET_KINDS",
           "residual_mapping", "RESIDUAL_REVISION"]

#: the residual mapping of concern module sets that do not record one (written before it was an option)
LEGACY_RESIDUAL = "sum"
#: the meaning of a recorded ``residual``: 2 since 2026-12-04, when ``"conv"`` became conv outputs
#: only; a set without ``residual_revision`` that says ``"conv"`` masked the identity input too
RESIDUAL_REVISION = 2


def residual_mapping(meta: dict, base=None) -> str:
    """The residual mapping a concern module set was decomposed with: ``meta["residual"]``,
    else its config's, else ``LEGACY_RESIDUAL``. A zoo ResNet's set written before
    ``RESIDUAL_REVISION`` 2 that says ``"conv"`` is ``"conv_identity"`` (what ``"conv"`` meant
    then); an adapted model's ``"conv"`` never masked an identity input and stays ``"conv"``."""
    mapping = str(meta.get("residual") or (meta.get("config") or {}).get("residual") or LEGACY_RESIDUAL)
    old = int(meta.get("residual_revision", 1)) < RESIDUAL_REVISION
    if mapping == "conv" and old and (base is None or has(base, DECLARED_GRAPH)):
        return "conv_identity"
    return mapping


class _Common:
    """What every module set offers; subclasses set ``set_kind``, ``forms`` and ``retangles``."""

    #: ``"kernel"`` or ``"concern"``, the ``kind`` key of ``modules.json`` (not a model's
    #: ``mask_kind``, nor a forward form, nor a run directory's artefact kind)
    set_kind: str = ""
    #: continuous learning re-tangles these modules against the other datasets' inputs
    retangles: bool = False
    #: forward forms this kind can run as (``modules.forward``)
    forms: tuple[str, ...] = ()
    base: SplittableModel
    meta: dict

    @property
    def normalization(self) -> Normalization:
        """The input normalisation the base model was trained with (``mean, std = ...``)."""
        norm = self.meta.get("normalization")
        if not norm:
            raise ValueError("module set has no 'normalization' in its metadata")
        return Normalization.of(norm)

    @property
    def class_names(self) -> list[str]:
        """Name of module c's class (``meta["class_names"]``, else its index)."""
        names = self.meta.get("class_names")
        return [str(c) for c in names] if names else [str(i) for i in range(self.num_modules)]

    @property
    def num_modules(self) -> int:
        raise NotImplementedError

    def stack_key(self) -> tuple:
        """What modules of one base structure must also share to run in one forward group."""
        return ()

    def saved_meta(self) -> dict:
        """``meta`` as ``modules.json`` records it."""
        return dict(self.meta)

    def forward_form(self, form: str) -> str:
        """The forward kind (``modules.forward.KINDS``) this set runs as when ``form`` is
        asked for; raises ValueError when the set cannot run that way."""
        if form not in self.forms:
            raise ValueError(f"{self.set_kind} module sets run as {self.forms}, not {form!r}")
        return form


@dataclasses.dataclass
class ModuleSet(_Common):
    """N modules of one base model given by kernel masks (GradSplitter, CNNSplitter).

    base: the trained model; masks: ``{point: float32 0/1 [N, C]}``; heads: stacked ``Heads``
    (GradSplitter) or ``None`` (module c is scored by its base model's logit c);
    meta: ``method``, ``dataset``, ``normalization`` {mean, std}, ``class_names``, ...
    """

    base: SplittableModel
    masks: dict
    heads: Heads | None
    meta: dict

    set_kind = "kernel"
    forms = ("masked", "extracted")

    @property
    def num_modules(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    def __post_init__(self):
        require(self.base, KERNEL_MASKS, "a ModuleSet (kernel masks)", "its modules are a ConcernModuleSet")
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

    def module_masks(self, c: int) -> dict:
        """Module c's masks ``{point: [C]}`` as stored (apply ``effective_masks`` to run them)."""
        return {k: np.asarray(v[c]) for k, v in self.masks.items()}

    def stack_key(self) -> tuple:
        """Modules scored by heads (GradSplitter) and by class logits (CNNSplitter) run apart."""
        return (self.heads is None,)

    def module_head(self, c: int):
        """Module c's head ``(w1, b1, w2, b2)``, or None for class-logit modules."""
        return None if self.heads is None else tuple(np.asarray(h)[c] for h in self.heads)

    def active_sets(self) -> np.ndarray:
        """bool [N, K]: the kernels each module keeps (keep-one rule; tied layers per layer)."""
        return np.asarray(flatten_masks(self.base, effective_masks(self.masks), tied=True)) > 0

    def structure(self, flops: bool = True) -> dict:
        """Kernel retention per module (tied layers counted per layer) and per layer x module,
        and (``flops``) the FLOPs of every physically extracted module vs the base model."""
        eff = effective_masks(self.masks)
        per_module = np.asarray(kept_kernels(self.base, eff)) / total_kernels(self.base)
        out = {"mean_kernel_retention": float(per_module.mean()),
               "kernel_retention": per_module.tolist(),
               "layer_retention": {s.name: (eff[s.mask].sum(-1) / s.out_channels).tolist()
                                   for s in self.base.topology}}
        if flops and not has(self.base, DECLARED_GRAPH):  # a user's model: extracted where its traced graph allows
            try:
                mods = extract_adapted_all([(self.base, self.module_masks(c)) for c in range(self.num_modules)])
            except ExtractionError as e:
                out["extraction"] = f"not available, the modules run in the masked form: {e}"
                return out
            base_f = adapted_flops(self.base)
            mf = [m.flops() for m in mods]
            out.update(base_flops=base_f, module_flops=mf, module_flops_ratio=[f / base_f for f in mf])
        elif flops:
            base_f = forward_flops(self.base)
            mf = [forward_flops(m.model) for m in extract_all(self.base, self.masks, self.heads)]
            out.update(base_flops=base_f, module_flops=mf, module_flops_ratio=[f / base_f for f in mf])
        return out

    def tree(self) -> dict:
        tree = {"masks": {k: np.asarray(v, np.float32) for k, v in self.masks.items()}}
        if self.heads is not None:
            tree["heads"] = tuple(np.asarray(h, np.float32) for h in self.heads)
        return tree

    @classmethod
    def template(cls, base: SplittableModel, n: int, meta: dict) -> dict:
        t = {"masks": {p.name: np.zeros((n, p.size), np.float32) for p in mask_points(base)}}
        if meta.get("heads", True):
            k = base.num_classes
            t["heads"] = (np.zeros((n, k, 10), np.float32), np.zeros((n, 10), np.float32),
                          np.zeros((n, 10), np.float32), np.zeros((n,), np.float32))
        return t

    @classmethod
    def from_tree(cls, base: SplittableModel, tree: dict, meta: dict) -> "ModuleSet":
        heads = Heads(*(np.asarray(h) for h in tree["heads"])) if "heads" in tree else None
        return cls(base, {k: np.asarray(v) for k, v in tree["masks"].items()}, heads, meta)


@dataclasses.dataclass
class ConcernModuleSet(_Common):
    """N binary modules of one ResNet by concern identification (``splitters.concern``).

    base: the trained ``ResNet``; inactive: ``{node: bool [N, H, W, C]}`` deactivated
    positions; head_w [N, F, 2] / head_b [N, 2]: channeled output layers (concerned,
    unconcerned); removed: bool [N, F] pooled features removed by MC-BLN; meta as ModuleSet.
    """

    base: SplittableModel
    inactive: dict
    head_w: np.ndarray
    head_b: np.ndarray
    removed: np.ndarray
    meta: dict

    set_kind = "concern"
    retangles = True
    forms = ("concern",)

    @property
    def num_modules(self) -> int:
        return int(self.head_w.shape[0])

    @property
    def residual(self) -> str:
        """The residual mapping of the node maps (``"conv"``: the paper's, ``"conv_identity"``,
        ``"sum"``): the one whose nodes the maps are (each mapping has its own node names),
        else as the metadata records it (``residual_mapping``)."""
        names = set(self.inactive)
        for mapping in RESIDUAL_MAPPINGS:
            try:
                if {nd.name for nd in self.base.nodes(mapping)} == names:
                    return mapping
            except ValueError:  # a model with one mapping
                continue
        return residual_mapping(self.meta, self.base)

    def saved_meta(self) -> dict:
        """``meta`` as ``modules.json`` records it: with the mapping of the maps under its
        current name (``RESIDUAL_REVISION``)."""
        return {**self.meta, "residual": self.residual, "residual_revision": RESIDUAL_REVISION}

    def forward_form(self, form: str) -> str:
        """Always ``"concern"``: these modules keep every weight and have no pruned form."""
        return "concern"

    def keep(self, index=slice(None)) -> dict:
        """float32 ``{node: [.., H, W, C]}`` multipliers (1 kept, 0 deactivated)."""
        return {k: 1.0 - np.asarray(v[index], np.float32) for k, v in self.inactive.items()}

    def active_sets(self) -> np.ndarray:
        """bool [N, P]: the node positions each module keeps active."""
        n = self.num_modules
        return np.concatenate([~np.asarray(v).reshape(n, -1) for v in self.inactive.values()], 1)

    def structure(self, flops: bool = True) -> dict:
        """Honest module size (parameters equal the model's but for the 2-column head: no
        weight is removed), the fraction of node positions each module keeps active (=
        ``position_jaccard_vs_model``, since the model keeps every position), and the paper's
        Jaccard index of each module's effective weights and biases with the model's
        (``jaccard_vs_model``, ``weight_jaccard``: distinct values, ours; ``lab_jaccard_vs_model``:
        the lab's function; and by position).
        ``flops`` is ignored (modules run the whole model)."""
        del flops
        active = self.active_sets().mean(-1)
        if has(self.base, DECLARED_GRAPH):
            ji_values, ji_positions = weight_jaccard(self, "values"), weight_jaccard(self, "positions")
            ji_lab = weight_jaccard(self, "lab")
        else:  # an adapted model: which weights feed which node is not known
            ji_values = ji_positions = ji_lab = np.full(self.num_modules, np.nan)
        params = count_params(self.base)
        f = self.base.fc_in
        size = {"model_params": params,
                "module_params": params - (f * self.base.num_classes + self.base.num_classes) + 2 * f + 2,
                "positions": int(self.active_sets().shape[1]),
                "active_fraction": active.tolist(), "mean_active_fraction": float(active.mean())}
        return {"module_size": size, "jaccard_vs_model": ji_values.tolist(),
                "mean_jaccard_vs_model": float(ji_values.mean()),
                "lab_jaccard_vs_model": ji_lab.tolist(), "mean_lab_jaccard_vs_model": float(ji_lab.mean()),
                "weight_position_jaccard_vs_model": ji_positions.tolist(),
                "mean_weight_position_jaccard_vs_model": float(ji_positions.mean()),
                "position_jaccard_vs_model": active.tolist(),
                "mean_position_jaccard_vs_model": float(active.mean())}

    def __post_init__(self):
        require(self.base, POSITION_NODES, "a ConcernModuleSet")
        shapes = {nd.name: nd.shape for nd in self.base.nodes(self.residual)}
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

    def tree(self) -> dict:
        return {"inactive": {k: np.asarray(v, np.uint8) for k, v in self.inactive.items()},
                "head_w": np.asarray(self.head_w, np.float32),
                "head_b": np.asarray(self.head_b, np.float32),
                "removed": np.asarray(self.removed, np.uint8)}

    @classmethod
    def template(cls, base: SplittableModel, n: int, meta: dict) -> dict:
        if not has(base, POSITION_NODES):
            raise ckpt.CheckpointError(f"a concern module set needs a base model with position nodes, found {base.arch!r}")
        f = base.fc_in
        residual = residual_mapping(meta, base)
        return {"inactive": {nd.name: np.zeros((n, *nd.shape), np.uint8) for nd in base.nodes(residual)},
                "head_w": np.zeros((n, f, 2), np.float32), "head_b": np.zeros((n, 2), np.float32),
                "removed": np.zeros((n, f), np.uint8)}

    @classmethod
    def from_tree(cls, base: SplittableModel, tree: dict, meta: dict) -> "ConcernModuleSet":
        return cls(base, {k: np.asarray(v).astype(bool) for k, v in tree["inactive"].items()},
                   np.asarray(tree["head_w"]), np.asarray(tree["head_b"]),
                   np.asarray(tree["removed"]).astype(bool), meta)


#: module-set classes by ``set_kind`` (the ``kind`` key of ``modules.json``)
MODULE_SET_KINDS = {cls.set_kind: cls for cls in (ModuleSet, ConcernModuleSet)}


def save_module_set(out_dir: str | Path, ms: ModuleSet | ConcernModuleSet) -> None:
    """Write ``ms`` to ``out_dir`` (see the module docstring for the layout)."""
    out = Path(out_dir)
    ckpt.save_model(out / "base", ms.base,
                    {k: ms.meta[k] for k in ("dataset", "normalization", "class_names") if k in ms.meta})
    tree = ms.tree()
    ckpt.save_tree(out / "modules", tree)
    common = {"num_modules": ms.num_modules, "arch": ms.base.arch, "width": ms.base.width,
              "kind": ms.set_kind, "heads": "heads" in tree}
    ckpt.write_json(out / "modules.json", {**ms.saved_meta(), **common})


def load_module_set(mod_dir: str | Path, *, trust_definition: bool | str = False) -> ModuleSet | ConcernModuleSet:
    """Load a module set written by ``save_module_set`` (e.g. by ``cnnsplit split``).

    ``trust_definition``: a module set of an adapted model loads its base model by importing
    the user's code; that needs this opt-in (``checkpoint.load_model``)."""
    mod_dir = Path(mod_dir)
    if not (mod_dir / "modules.json").is_file():
        raise ckpt.CheckpointError(f"no module set in {mod_dir} (expected modules.json from `cnnsplit split`)")
    meta = ckpt.read_json(mod_dir / "modules.json")
    kind = meta.get("kind")
    if kind is not None and kind not in MODULE_SET_KINDS:
        raise ckpt.CheckpointError(f"{mod_dir}: unknown module-set kind {kind!r}")
    base, _ = ckpt.load_model(mod_dir / "base", trust_definition=trust_definition)
    if kind is None:  # written before the key existed: the base model's masks tell
        kind = "concern" if has(base, POSITION_NODES) else "kernel"
    cls = MODULE_SET_KINDS[kind]
    template = cls.template(base, int(meta["num_modules"]), meta)
    return cls.from_tree(base, ckpt.load_tree(mod_dir / "modules", template), meta)
