"""MwT (Qi et al., ICSE 2024) with this library on Fashion-MNIST at a CPU-sized scale: standard
training vs modular training, the modularization's metrics, and sub-task reuse.

    apt-get install dataset-fashion-mnist
    python benchmarks/mwt_experiments.py --seeds 0 1 2 --out benchmarks/measured/mwt

Per seed (every stage cached under ``--runs``; a killed run continues):

* ``standard``: SimCNN (``--width``, FC ``--fc-hidden``) trained with cross-entropy;
* ``mwt``: the same architecture and seed trained with MwT's generators and losses;
  both with the same optimiser and schedule (the ``mwt-quick`` recipe: SGD Nesterov 0.9,
  lr 0.05, cosine annealing over ``--epochs``, no weight decay, best validation epoch) on the
  first ``--train-images`` training images;
* ``split``: MwT's modularization (threshold 0.9): kernel retention over the generated layers,
  cohesion, coupling, the accuracy with and without generators, training + modularizing time;
* ``subtask``: for every pair of ``--pairs`` classes, the MwT module of the pair fine-tuned
  (10 epochs, cosine over 20, best validation epoch) against the standard model restricted to
  the pair's logits.

Writes ``OUT/mwt.json`` (every record) and ``OUT/mwt.md`` (mean +- std over seeds, the paper's
figures beside). Deviations from the paper: Fashion-MNIST (not CIFAR-10 / SVHN), a narrow
SimCNN, ``--train-images`` images, ``--epochs`` epochs (not 200), the best validation epoch
(the reference keeps the last, and picks a sub-task module's epoch on the test set).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from cnnsplit_jax import checkpoint as ckpt
from cnnsplit_jax.data import load_dataset
from cnnsplit_jax.modules import load_module_set
from cnnsplit_jax.pipeline import split_run, train_run
from cnnsplit_jax.splitters.mwt import MwTConfig, MwTSplitConfig
from cnnsplit_jax.splitters.mwt.reuse import SUBTASK_RECIPE, fine_tune_subtask, restricted_accuracy
from cnnsplit_jax.train import RECIPES, TrainConfig

PAPER = {"accuracy_loss_pt": 1.13, "kernel_retention": 0.1458, "note": "VGG16-BN / ResNet-18 on CIFAR-10 / SVHN"}


def _cached(path: Path, make):
    if path.exists():
        return json.loads(path.read_text())
    rec = make()
    ckpt.write_json(path, rec)
    return rec


def run_seed(args, seed: int) -> dict:
    runs = Path(args.runs) / f"seed{seed}"
    cfg = TrainConfig(**{**RECIPES["mwt-quick"], "epochs": args.epochs, "seed": seed,
                         "train_images": args.train_images})
    common = dict(width=args.width, fc_hidden=args.fc_hidden, recipe="mwt-quick")

    def train(kind):
        out = runs / kind
        if (out / "train.json").exists():
            return json.loads((out / "train.json").read_text())
        return train_run(out, "simcnn", "fashion_mnist", cfg, overwrite=True,
                         modular=MwTConfig() if kind == "mwt" else None, **common)

    std, mwt = train("standard"), train("mwt")
    split = _cached(runs / "split_record.json", lambda: split_run(runs / "mwt", runs / "mwt_modules", "mwt",
                                                                  MwTSplitConfig(seed=seed), overwrite=True))
    ds = load_dataset("fashion_mnist")
    ms = load_module_set(runs / "mwt_modules")
    std_model, _ = ckpt.load_model(runs / "standard")
    pairs = []
    for a, b in itertools.combinations(args.pairs, 2):
        def one(a=a, b=b):
            t0 = time.perf_counter()
            r = fine_tune_subtask(ms, ds, [a, b], TrainConfig(**{**SUBTASK_RECIPE, "seed": seed}))
            return {"classes": [a, b], "module_accuracy": r.test_accuracy, "module_kernel_retention": r.kernel_retention,
                    "best_epoch": r.fit.best_epoch, "seconds": time.perf_counter() - t0,
                    "standard_restricted_accuracy": restricted_accuracy(std_model, ds, [a, b])}
        pairs.append(_cached(runs / f"subtask_{a}{b}.json", one))
    m = split["mwt"]
    return {"seed": seed, "standard_test_accuracy": std["test_accuracy"], "standard_best_epoch": std["best_epoch"],
            "standard_train_seconds": std["train_seconds"], "mwt_test_accuracy": mwt["test_accuracy"],
            "mwt_test_accuracy_without_generators": mwt["test_accuracy_without_generators"],
            "mwt_best_epoch": mwt["best_epoch"], "mwt_train_seconds": mwt["train_seconds"],
            "kernel_retention": m["kernel_retention"], "cohesion": m["cohesion"], "coupling": m["coupling"],
            "modularize_seconds": m["modularize_seconds"], "composed_accuracy_without_generators":
                split["composed_accuracy"], "subtasks": pairs}


def _ms(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"


def table(records: list[dict]) -> str:
    rows = [
        ("standard test accuracy", [r["standard_test_accuracy"] for r in records], ""),
        ("MwT test accuracy (with generators)", [r["mwt_test_accuracy"] for r in records], ""),
        ("accuracy loss, pt", [100 * (r["standard_test_accuracy"] - r["mwt_test_accuracy"]) for r in records],
         f"{PAPER['accuracy_loss_pt']}"),
        ("MwT model without generators", [r["mwt_test_accuracy_without_generators"] for r in records], ""),
        ("kernel retention (generated layers)", [r["kernel_retention"] for r in records], f"{PAPER['kernel_retention']}"),
        ("cohesion (Jaccard)", [r["cohesion"] for r in records], ""),
        ("coupling (Jaccard)", [r["coupling"] for r in records], ""),
        ("standard training s", [r["standard_train_seconds"] for r in records], ""),
        ("MwT training + modularizing s", [r["mwt_train_seconds"] + r["modularize_seconds"] for r in records], ""),
    ]
    out = [f"seeds: {[r['seed'] for r in records]}", "", "| | mean ± std | paper |", "|---|---|---|"]
    out += [f"| {name} | {_ms(v)} | {paper} |" for name, v, paper in rows]
    sub = [(r["seed"], p) for r in records for p in r["subtasks"]]
    if sub:
        d = [100 * (p["module_accuracy"] - p["standard_restricted_accuracy"]) for _, p in sub]
        out += ["", "| seed | classes | MwT module (fine-tuned) | standard restricted | retention |", "|---|---|---|---|---|"]
        out += [f"| {s} | {p['classes']} | {p['module_accuracy']:.4f} | {p['standard_restricted_accuracy']:.4f} | "
                f"{p['module_kernel_retention']:.3f} |" for s, p in sub]
        out += ["", f"module - standard over {len(d)} pairs: {np.mean(d):+.2f} ± {np.std(d, ddof=1) if len(d) > 1 else 0:.2f} "
                f"pt; {sum(x >= 0 for x in d)}/{len(d)} as good or better"]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", default="/tmp/mwt_runs")
    p.add_argument("--out", default="benchmarks/measured/mwt")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--fc-hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--pairs", type=int, nargs="+", default=[0, 3, 6], help="classes whose pairs are sub-tasks")
    args = p.parse_args()
    records = [run_seed(args, s) for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "mwt.json", {"args": vars(args), "records": records, "paper": PAPER})
    (out / "mwt.md").write_text(table(records))
    print(table(records))


if __name__ == "__main__":
    main()
