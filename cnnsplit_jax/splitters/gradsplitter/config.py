"""GradSplitter's hyper-parameters, presets and epoch schedule.

Schedule: ``head_epochs`` head-only epochs, then cycles of ``cycle_mod`` modularization +
``cycle_head`` head epochs (the reference: 5 + 20 x (5 + 2) = 145 epochs). A fresh Adam at
every phase change: head phases train the heads only, at ``lr_head`` first and
``lr_head * 0.1`` later; modularization phases train masks and heads at ``lr_modularity``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from ...validate import at_least, finite

__all__ = ["GradSplitterConfig", "PRESETS", "MOD", "HEAD", "phase_schedule", "phase_lr",
           "round_modularity_epochs", "schedule_warnings", "configure", "run_warnings"]

MOD, HEAD = 1, 0


@dataclasses.dataclass(frozen=True)
class GradSplitterConfig:
    """Hyper-parameters; defaults are the reference's (``--epoch_strategy 5,140`` etc.)."""

    alpha: float = 0.1
    """weight of the kept-kernel term in modularization phases"""
    lr_head: float = 0.01
    """Adam learning rate of the first head phase (later head phases: a tenth of it)"""
    init: Literal["ones", "random", "zeros"] = "ones"
    """masks start at ones, random (N(0, 1)) or zeros"""
    head_epochs: int = 5
    """leading head-only epochs"""
    modularity_epochs: int = 140
    """epochs in whole cycles of ``cycle_mod`` modularization + ``cycle_head`` head epochs"""
    cycle_mod: int = 5
    """modularization epochs per cycle"""
    cycle_head: int = 2
    """head epochs per cycle"""
    lr_modularity: float = 0.001
    """Adam learning rate of modularization phases (masks and heads)"""
    module_chunk: int | None = None
    """modules per vmapped group inside the one jitted step (None: ``modules.forward.default_chunk``)"""
    remat: bool | None = None
    """recompute each module group's activations in the backward pass (memory of one group, a second
    forward); None: when the estimate exceeds the memory budget (``gradsplitter.memory``)"""
    batch_size: int = 64
    """images per step"""
    eval_batch_size: int = 256
    """images per forward pass of the feature and validation passes"""
    dedupe_features: bool = True
    """compute modules with identical masks once in head phases"""
    select_tolerance: float = 0.01
    """accuracy loss allowed when choosing the epoch with the fewest kernels"""
    seed: int = 0
    """the CLI's search key (``jax.random.key(seed)``)"""

    def __post_init__(self):
        if self.init not in get_args(Literal["ones", "random", "zeros"]):
            raise ValueError(f"init must be ones, random or zeros, got {self.init!r}")
        for name, lo in (("head_epochs", 0), ("modularity_epochs", 0), ("batch_size", 1), ("eval_batch_size", 1),
                         ("cycle_mod", 1), ("cycle_head", 0), ("seed", 0)):
            at_least(name, getattr(self, name), lo)
        at_least("module_chunk", self.module_chunk, 1, optional=True)
        for name in ("lr_head", "lr_modularity"):
            finite(name, getattr(self, name), lo=0.0, strict=True)
        finite("alpha", self.alpha, lo=0.0)
        finite("select_tolerance", self.select_tolerance, lo=0.0, hi=1.0)
        cycle = self.cycle_mod + self.cycle_head
        if self.modularity_epochs % cycle:
            lo = self.modularity_epochs - self.modularity_epochs % cycle
            raise ValueError(
                f"modularity_epochs={self.modularity_epochs} is not a whole number of "
                f"{cycle}-epoch cycles ({self.cycle_mod} modularization + {self.cycle_head} head): "
                f"use {lo or cycle}" + (f" or {lo + cycle}" if lo else ""))


#: named settings (``GradSplitterConfig(**PRESETS[name], ...)``): the reference's defaults, and
#: a short run that removes kernels within a few hundred steps (the demo's)
PRESETS: dict[str, dict] = {
    "reference": {},
    "quick": {"head_epochs": 2, "modularity_epochs": 28, "lr_modularity": 0.02},
}


def round_modularity_epochs(epochs: int, cycle_mod: int = 5, cycle_head: int = 2) -> int:
    """``epochs`` rounded up to whole cycles (what a user asking for ``epochs`` gets)."""
    cycle = cycle_mod + cycle_head
    return -(-epochs // cycle) * cycle


def phase_schedule(cfg: GradSplitterConfig) -> list[int]:
    """Phase of every epoch: 0 = head, 1 = modularity (reference: [0]*5 + [1]*5+[0]*2 ...)."""
    cycle = [MOD] * cfg.cycle_mod + [HEAD] * cfg.cycle_head
    return [HEAD] * cfg.head_epochs + cycle * (cfg.modularity_epochs // len(cycle))


def phase_lr(cfg: GradSplitterConfig, epoch: int, phase: int) -> float:
    """Adam learning rate of the phase starting at ``epoch``."""
    if phase == MOD:
        return cfg.lr_modularity
    return cfg.lr_head if epoch < cfg.head_epochs else cfg.lr_head * 0.1


def schedule_warnings(cfg: GradSplitterConfig, steps_per_epoch: int) -> list[str]:
    """Why a search with ``cfg`` cannot do what it is run for (empty when it can).

    Adam moves a parameter by at most about ``lr`` per step, so masks starting at 1
    (``init="ones"``) cannot reach 0 in fewer than ``1 / lr_modularity`` modularization steps:
    such a search removes no kernel.
    """
    out = []
    mod_steps = sum(phase_schedule(cfg)) * steps_per_epoch
    if mod_steps == 0:
        out.append("the schedule has no modularization epoch: no kernel will be removed")
    elif cfg.init == "ones" and mod_steps * cfg.lr_modularity < 1.0:
        out.append(
            f"{mod_steps} modularization steps at lr {cfg.lr_modularity:g} move a mask by at most "
            f"about {mod_steps * cfg.lr_modularity:.2f}, but masks start at 1: no kernel can be "
            "removed; use more epochs or images, a larger lr_modularity, or the 'quick' preset")
    return out


def configure(overrides: dict, recipe: str | None = None, *, arch: str = "", dataset: str = ""):
    """The config of a run: preset ``recipe`` (None: ``reference``) with ``overrides`` (config
    fields) on top; ``modularity_epochs`` rounded up to whole cycles. ``arch`` / ``dataset``
    are unused (every GradSplitter preset fits every model). Returns ``(config, warnings,
    notes)``: the rounding, when it changed the value, is a warning."""
    del arch, dataset
    name = recipe or "reference"
    if name not in PRESETS:
        raise ValueError(f"--recipe {recipe} is not a GradSplitter preset; expected one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    epochs = overrides.get("modularity_epochs")
    epochs = epochs if epochs is not None else preset.get("modularity_epochs", GradSplitterConfig.modularity_epochs)
    rounded = round_modularity_epochs(epochs)
    warnings = [] if rounded == epochs else [
        f"--modularity-epochs {epochs} is not a whole number of 7-epoch cycles (5 modularization + 2 head); "
        f"running {rounded}"]
    return GradSplitterConfig(**{**preset, **overrides, "modularity_epochs": rounded}), warnings, []


def run_warnings(cfg: GradSplitterConfig, train_images: int) -> list[str]:
    """``schedule_warnings`` for a search over ``train_images`` training images."""
    return schedule_warnings(cfg, -(-train_images // cfg.batch_size))
