"""Concern identification (Pan & Rajan) on real data: decomposition cost, reuse and
replacement with ResNet-20 on Fashion-MNIST (+ digits for inter-dataset reuse).

    apt-get install dataset-fashion-mnist
    cnnsplit train --model resnet20 --dataset fashion_mnist --width 1 --epochs 12 --out runs/fm_r20w1
    cnnsplit train --model resnet20 --dataset fashion_mnist --width 0.5 --epochs 8 --out runs/fm_r20
    python benchmarks/real_data_concern.py --strong runs/fm_r20w1 --weak runs/fm_r20

Scenarios (spec field-survey.md §1.5-1.8), all printed as README-ready tables and written to
``--json``:

* decomposition cost (top-1 / top-5), Jaccard index, active positions and time, for
  CI+TI+MC (``--backtrack none``) and MC-BLN, of both models;
* intra-dataset reuse: 2-class models from two modules of the strong model, for the 6 pairs
  of 4 random classes, vs the same architecture trained from scratch on the pair
  (``--baseline-epochs``);
* inter-dataset reuse: one Fashion-MNIST module + one digits module (a ResNet-20 trained on
  digits here if ``--digits`` is absent), without and with continuous learning, vs training
  from scratch;
* intra-dataset replacement: every module of the weak model's composition swapped for the
  strong model's (top-1 / top-5 change).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cnnsplit_jax.compose import Pick, compose, predict_scores
from cnnsplit_jax.data import load_task
from cnnsplit_jax.evaluate import topk_accuracy
from cnnsplit_jax.modules import load_module_set
from cnnsplit_jax.pipeline import split_run, train_run
from cnnsplit_jax.reuse import continuous_learning, train_from_scratch
from cnnsplit_jax.splitters import ConcernConfig
from cnnsplit_jax.train import RECIPES, TrainConfig


def _split(run: Path, backtrack: str) -> dict:
    out = run.parent / f"{run.name}-concern-{backtrack}"
    if not (out / "split.json").exists():
        split_run(run, out, "concern", ConcernConfig(backtrack=backtrack))
    return {"dir": out, **json.loads((out / "split.json").read_text())}


def _scores(picks, task):
    s = predict_scores(compose(picks), task.ds.x_test)
    y = task.ds.y_test
    return {"top1": float((s.argmax(-1) == y).mean()), "top5": topk_accuracy(s, y, 5)}


def _baseline(task, width, epochs, seed):
    cfg = TrainConfig(**{**RECIPES["resnet"], "epochs": epochs, "batch_size": 64, "seed": seed})
    return train_from_scratch(task, "resnet20", width, cfg, key=seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strong", required=True, help="run dir of the stronger ResNet-20 (Fashion-MNIST)")
    p.add_argument("--weak", required=True, help="run dir of the weaker ResNet-20 (Fashion-MNIST)")
    p.add_argument("--digits", default=None, help="run dir of a ResNet-20 on digits (trained if absent)")
    p.add_argument("--baseline-epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="results/real_data_concern.json")
    a = p.parse_args(argv)
    strong, weak = Path(a.strong), Path(a.weak)
    res = {"decomposition": {}}

    print("| model | variant | model top-1 / top-5 | composed top-1 / top-5 | cost top-1 / top-5 (pt) | "
          "Jaccard modules / vs model | active positions | time (s) |\n|---|---|---|---|---|---|---|---|")
    splits = {}
    for run in (strong, weak):
        w = json.loads((run / "model.json").read_text())["width"]
        for bt in ("none", "bln"):
            r = _split(run, bt)
            splits[(run, bt)] = r
            res["decomposition"][f"{run.name}/{bt}"] = {k: r[k] for k in (
                "base_accuracy", "base_top5", "composed_accuracy", "composed_top5", "accuracy_loss",
                "top5_loss", "mean_jaccard", "mean_jaccard_vs_model", "decomposition_seconds")}
            print(f"| ResNet-20 w{w:g} | {'CI+TI+MC' if bt == 'none' else 'MC-BLN'} | {r['base_accuracy']:.4f} / "
                  f"{r['base_top5']:.4f} | {r['composed_accuracy']:.4f} / {r['composed_top5']:.4f} | "
                  f"{100 * r['accuracy_loss']:.2f} / {100 * r['top5_loss']:.2f} | {r['mean_jaccard']:.3f} / "
                  f"{r['mean_jaccard_vs_model']:.3f} | {r['module_size']['mean_active_fraction']:.3f} | "
                  f"{r['decomposition_seconds']:.1f} |", flush=True)

    width = json.loads((strong / "model.json").read_text())["width"]
    ms = load_module_set(splits[(strong, "bln")]["dir"])
    rng = np.random.default_rng(a.seed)
    classes = sorted(rng.choice(10, 4, replace=False).tolist())
    print(f"\nintra-dataset reuse (classes {classes}):\n| pair | composed | trained from scratch | delta (pt) |\n|---|---|---|---|")
    intra = []
    for c1, c2 in itertools.combinations(classes, 2):
        task = load_task(f"fashion_mnist:{c1},{c2}")
        comp = _scores([Pick(ms, c1), Pick(ms, c2)], task)["top1"]
        base = _baseline(task, width, a.baseline_epochs, a.seed)
        intra.append({"pair": [c1, c2], "composed": comp, "scratch": base["accuracy"],
                      "scratch_seconds": base["train_seconds"]})
        print(f"| {c1},{c2} | {comp:.4f} | {base['accuracy']:.4f} | {100 * (comp - base['accuracy']):+.2f} |", flush=True)
    res["intra_reuse"] = intra

    digits = Path(a.digits) if a.digits else strong.parent / "digits_r20"
    if not (digits / "train.json").exists():
        train_run(digits, "resnet20", "digits", TrainConfig(**{**RECIPES["resnet"], "epochs": 30, "batch_size": 64}),
                  width=0.5, recipe="resnet")
    dms = load_module_set(_split(digits, "bln")["dir"])
    print("\ninter-dataset reuse (Fashion-MNIST module + digits module):\n"
          "| task | composed | + continuous learning | trained from scratch |\n|---|---|---|---|")
    inter = []
    for fc, dc in list(zip(classes, rng.choice(10, 4, replace=False).tolist()))[:3]:
        task = load_task(f"fashion_mnist:{fc}+digits:{dc}")
        picks = [Pick(ms, fc), Pick(dms, dc)]
        plain = _scores(picks, task)["top1"]
        cl = _scores(continuous_learning(picks, task, key=jax.random.key(a.seed)), task)["top1"]
        base = _baseline(task, width, a.baseline_epochs, a.seed)["accuracy"]
        inter.append({"fashion": fc, "digit": dc, "composed": plain, "continuous_learning": cl, "scratch": base})
        print(f"| fashion {fc} + digit {dc} | {plain:.4f} | {cl:.4f} | {base:.4f} |", flush=True)
    res["inter_reuse"] = inter

    wms = load_module_set(splits[(weak, "bln")]["dir"])
    task = load_task("fashion_mnist")
    picks = [Pick(wms, c, "weak") for c in range(10)]
    before = _scores(picks, task)
    print(f"\nintra-dataset replacement (weak composition top-1 {before['top1']:.4f} / top-5 {before['top5']:.4f}):\n"
          "| class | top-1 change (pt) | top-5 change (pt) |\n|---|---|---|")
    rep = []
    for c in range(10):
        t0 = time.perf_counter()
        after = _scores(picks[:c] + [Pick(ms, c, "strong")] + picks[c + 1:], task)
        rep.append({"class": c, "top1_change": after["top1"] - before["top1"],
                    "top5_change": after["top5"] - before["top5"], "seconds": time.perf_counter() - t0})
        print(f"| {c} | {100 * rep[-1]['top1_change']:+.2f} | {100 * rep[-1]['top5_change']:+.2f} |", flush=True)
    res["replacement"] = {"before": before, "swaps": rep,
                          "mean_top1_change": float(np.mean([r["top1_change"] for r in rep])),
                          "mean_top5_change": float(np.mean([r["top5_change"] for r in rep])),
                          "as_good_or_better_top1": int(sum(r["top1_change"] >= 0 for r in rep))}
    print(f"mean change top-1 {100 * res['replacement']['mean_top1_change']:+.2f} pt, top-5 "
          f"{100 * res['replacement']['mean_top5_change']:+.2f} pt; "
          f"{res['replacement']['as_good_or_better_top1']}/10 swaps as good or better (top-1)")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
