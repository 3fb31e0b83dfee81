"""Full pipeline on real data (Fashion-MNIST IDX files): train narrow SimCNN and ResCNN,
run GradSplitter with a schedule that fits a 2-core CPU, evaluate, print a README table row.

    apt-get install dataset-fashion-mnist        # or IDX files in $CNNSPLIT_DATA/fashion_mnist
    python benchmarks/real_data_gradsplitter.py [--out runs/fmnist] [--models simcnn rescnn]

Reduced setup (stated in the output): width 0.125, 5 training epochs, GradSplitter on the
first 8,000 images of the base model's training split, 2 head + 21 modularity-cycle epochs
(3 x (5 modularity + 2 head)), lr_modularity 0.005, otherwise the reference's defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cnnsplit_jax.cli.report import metric
from cnnsplit_jax.pipeline import split_run, train_run
from cnnsplit_jax.splitters import GradSplitterConfig
from cnnsplit_jax.train import TrainConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fmnist")
    p.add_argument("--models", nargs="+", default=["simcnn", "rescnn"])
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=8000)
    p.add_argument("--modularity-epochs", type=int, default=21)
    p.add_argument("--lr-modularity", type=float, default=0.005)
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = []
    for m in a.models:
        run, mods = out / m, out / f"{m}-grad"
        if not (run / "train.json").exists():
            train_run(run, m, "fashion_mnist", TrainConfig(epochs=a.epochs, batch_size=128, lr=0.05,
                                                           lr_milestones=(0.6,)), width=a.width,
                      resume=(run / "train_state.json").exists())
        if not (mods / "split.json").exists():
            cfg = GradSplitterConfig(head_epochs=2, modularity_epochs=a.modularity_epochs,
                                     lr_modularity=a.lr_modularity)
            split_run(run, mods, "grad", cfg, train_subset=a.train_subset,
                      resume=(mods / "search.json").exists())
        tr = json.loads((run / "train.json").read_text())
        sp = json.loads((mods / "split.json").read_text())
        rows.append((m, tr, sp))
    print("\n| model | width | base test acc (full test set) | base acc (test split) | composed acc | "
          "mean kernel retention | mean module F1 | train s | search s | epochs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, tr, sp in rows:
        print(f"| {m} | {tr['width']} | {tr['test_accuracy']:.4f} | {sp['base_accuracy']:.4f} | "
              f"{sp['composed_accuracy']:.4f} | {sp['mean_kernel_retention']:.3f} | "
              f"{metric(sp['mean_module_f1'])} | {tr['train_seconds']:.0f} | "
              f"{sp['search_seconds']:.0f} | {sp['epochs']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
