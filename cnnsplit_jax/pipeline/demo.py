"""The end-to-end demo on the embedded digits set: train a narrow SimCNN, split it with
GradSplitter, evaluate, compose the 10 physically extracted modules, and patch a deliberately
weak model's class 3 with module 3. Re-running continues where a previous run stopped."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .. import checkpoint as ckpt
from .. import mesh as meshlib
from ..splitters import METHODS
from ..splitters.gradsplitter import PRESETS, GradSplitterConfig
from ..train import RECIPES, TrainConfig
from .reuse import compose_run, patch_run
from .runs import exclusive, prepare_out, train_run
from .split import split_run

__all__ = ["DemoConfig", "demo"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """seed: every run's seed; modularity_epochs: GradSplitter's modularization cycles (whole
    7-epoch cycles of the 'quick' preset)."""

    seed: int = 0
    modularity_epochs: int = PRESETS["quick"]["modularity_epochs"]


@exclusive("out")
def demo(out: str | Path, cfg: DemoConfig = DemoConfig(), *, callbacks=None, overwrite: bool = False,
         mesh=None) -> dict:
    """Run the demo into ``out`` (``base/``, ``modules/``, ``compose/``, ``weak/``, ``patch/`` and
    ``demo.json``). ``mesh``: a ``data`` mesh every stage splits its batches over (None: each
    stage's default, every device on its natural axis). Returns ``{"train", "split",
    "compose", "patch", "seconds"}``."""
    if mesh is not None:  # a bad spec fails before any work
        mesh = meshlib.make_mesh(mesh, natural="data", allowed=("data",))
    out = prepare_out(out, "demo", overwrite=overwrite)
    if not (out / "demo.json").exists():  # marks the directory as the demo's from the start
        ckpt.write_json(out / "demo.json", {"config": ckpt.config_json(cfg), "status": "running"})
    t0 = time.perf_counter()
    run, mods, weak = out / "base", out / "modules", out / "weak"
    if (run / "train.json").exists():
        train = ckpt.read_json(run / "train.json")
    else:
        train = train_run(run, "simcnn", "digits", TrainConfig(**RECIPES["quick"], seed=cfg.seed), width=0.125,
                          recipe="quick", resume=ckpt.progress_exists(run, "train_state"), callbacks=callbacks,
                          mesh=mesh)
    gcfg = GradSplitterConfig(**{**PRESETS["quick"], "modularity_epochs": cfg.modularity_epochs}, seed=cfg.seed)
    if (mods / "split.json").exists():
        split = ckpt.read_json(mods / "split.json")
    else:
        split = split_run(run, mods, "grad", gcfg, resume=ckpt.progress_exists(mods, METHODS["grad"].progress),
                          callbacks=callbacks, mesh=mesh)
    comp = compose_run([str(mods)], out / "compose", form="extracted", mesh=mesh)
    if not (weak / "train.json").exists():
        train_run(weak, "simcnn_weak", "digits:0-2,4-9,3",
                  TrainConfig(**{**RECIPES["weak"], "epochs": 2, "batch_size": 64}, seed=cfg.seed), width=0.125,
                  recipe="weak", resume=ckpt.progress_exists(weak, "train_state"), mesh=mesh)
    pt = patch_run(weak, str(mods), 3, out / "patch", mesh=mesh)
    res = {"train": train, "split": split, "compose": comp, "patch": pt, "seconds": time.perf_counter() - t0}
    ckpt.write_json(out / "demo.json", {"config": ckpt.config_json(cfg), "status": "done", "seconds": res["seconds"],
                                        "composed_accuracy": split["composed_accuracy"],
                                        "extracted_accuracy": comp["accuracy"],
                                        "patch_f1": [pt["before"]["f1"], pt["after"]["f1"]]})
    return res
