"""MwT (Qi et al., ICSE 2024) with this library on Fashion-MNIST at a CPU-sized scale: standard
training vs modular training, the modularization's metrics, and sub-task reuse.

    apt-get install dataset-fashion-mnist
    python benchmarks/mwt_experiments.py --seeds 0 1 2 --out benchmarks/measured/mwt

Per seed (every stage cached under ``--runs``; a killed run continues):

* ``standard``: SimCNN (``--width``, FC ``--fc-hidden``), or ResCNN, trained with cross-entropy;
* ``mwt``: the same architecture and seed trained with MwT's generators and losses;
  both with the same optimiser and schedule (the ``mwt-quick`` recipe: SGD Nesterov 0.9,
  lr 0.05, cosine annealing over ``--epochs``, no weight decay, best validation epoch) on the
  first ``--train-images`` training images;
* ``split``: MwT's modularization (threshold 0.9): kernel retention over the generated layers,
  cohesion, coupling, the accuracy with and without generators, training + modularizing time;
* ``grad`` / ``ga``: GradSplitter (the ``quick`` preset) and CNNSplitter (the ``narrow``
  preset) on the standard model: kernel retention over all conv layers, the composed
  accuracy of the ten modules, the coupling (rolling Jaccard of the module masks, MwT's
  definition), wall time;
* ``cohesion`` of every method's modules as the reference measures CNNSplitter's: each module
  on its class's test images, a kernel active for an image when its output after the ReLU
  (and BatchNorm), averaged over positions, is > 0, the Jaccard index over every pair of images
  (``activation_cohesion``; MwT's own cohesion above uses its generators' masks instead);
* ``subtask``: for every pair of ``--pairs`` classes, each method's module of the pair
  fine-tuned the reference's way (union of the two masks, extracted, new head, 10 epochs,
  cosine over 20, best validation epoch) against the standard model restricted to the pair's
  logits; and the pair's modules composed as they are, the reference's reuse of CNNSplitter's
  modules (``composed_pair``: no fine-tuning, kernels added up).

``--arch rescnn`` runs the same on ResCNN (a generator per conv, each tied residual pair's
module keeping the union of its two layers' kernels). Writes ``OUT/mwt_<arch>.json`` (every
record) and ``OUT/mwt_<arch>.md`` (mean +- std over seeds, the paper's
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

from common import environment

from cnnsplit_jax import checkpoint as ckpt
from cnnsplit_jax.compose import Pick, compose, predict_scores
from cnnsplit_jax.data import load_dataset, select_classes
from cnnsplit_jax.models import kept_kernels, total_kernels
from cnnsplit_jax.modules import load_module_set
from cnnsplit_jax.pipeline import split_run, train_run
from cnnsplit_jax.splitters import method as method_record
from cnnsplit_jax.splitters.mwt import MwTConfig, MwTSplitConfig, activation_cohesion, module_coupling
from cnnsplit_jax.splitters.mwt.reuse import SUBTASK_RECIPE, fine_tune_subtask, restricted_accuracy
from cnnsplit_jax.train import RECIPES, TrainConfig

PRESETS = {"grad": "quick", "ga": "narrow"}
PAPER = {"accuracy_loss_pt": 1.13, "kernel_retention": 0.1458, "note": "VGG16-BN / ResNet-18 on CIFAR-10 / SVHN"}


def _cached(path: Path, make):
    if path.exists():
        return json.loads(path.read_text())
    rec = make()
    ckpt.write_json(path, rec)
    return rec


def composed_pair(ms, ds, classes) -> dict:
    """The reference's reuse of CNNSplitter's modules on a sub-task
    (``exp_cnnsplitter_reusing/reuse_modules.py``): the classes' modules as they are, no
    fine-tuning, each scoring its own class, the argmax over them on the classes' test images;
    kernel rate = the modules' kept kernels added up (not their union) / the model's kernels."""
    task = select_classes(ds, classes)
    scores = predict_scores(compose([Pick(ms, c) for c in classes]), task.x_test)
    kept = sum(float(kept_kernels(ms.base, ms.module_masks(c))) for c in classes)
    return {"accuracy": float((scores.argmax(1) == task.y_test).mean()),
            "kernel_rate": kept / total_kernels(ms.base)}


def run_seed(args, seed: int) -> dict:
    runs = Path(args.runs) / (f"seed{seed}" if args.arch == "simcnn" else f"{args.arch}/seed{seed}")
    cfg = TrainConfig(**{**RECIPES["mwt-quick"], "epochs": args.epochs, "seed": seed,
                         "train_images": args.train_images})
    common = dict(width=args.width, fc_hidden=args.fc_hidden if args.arch == "simcnn" else None, recipe="mwt-quick")

    def train(kind):
        out = runs / kind
        if (out / "train.json").exists():
            return json.loads((out / "train.json").read_text())
        return train_run(out, args.arch, "fashion_mnist", cfg, overwrite=True,
                         method="mwt" if kind == "mwt" else None, method_config=MwTConfig() if kind == "mwt" else None,
                         **common)

    std, mwt = train("standard"), train("mwt")

    def timed_split(base, out, name, cfg):
        t0 = time.perf_counter()
        progress = method_record(name).progress  # a search killed half-way resumes
        resume = progress is not None and ckpt.progress_exists(runs / out, progress)
        rec = split_run(runs / base, runs / out, name, cfg, resume=resume, overwrite=not resume)
        return {**rec, "wall_seconds": time.perf_counter() - t0}

    split = _cached(runs / "split_record.json", lambda: timed_split("mwt", "mwt_modules", "mwt",
                                                                    MwTSplitConfig(seed=seed)))
    sets = {"mwt": split}
    for name in args.methods if args.method_seeds is None or seed in args.method_seeds else ():
        cfg_m = method_record(name).make_config({"seed": seed}, PRESETS[name], arch=args.arch,
                                                dataset="fashion_mnist")[0]
        sets[name] = _cached(runs / f"split_{name}.json",
                             lambda name=name, cfg_m=cfg_m: timed_split("standard", f"{name}_modules", name, cfg_m))
    ds = load_dataset("fashion_mnist")
    std_model, _ = ckpt.load_model(runs / "standard")
    methods = {}
    for name, rec in sets.items():
        ms = load_module_set(runs / f"{name}_modules")
        flat = np.concatenate([np.asarray(v) for v in ms.masks.values()], axis=1) > 0
        pairs = []
        for a, b in itertools.combinations(args.pairs, 2):
            def one(a=a, b=b, ms=ms):
                t0 = time.perf_counter()
                r = fine_tune_subtask(ms, ds, [a, b], TrainConfig(**{**SUBTASK_RECIPE, "seed": seed}))
                return {"classes": [a, b], "module_accuracy": r.test_accuracy,
                        "module_kernel_retention": r.kernel_retention, "best_epoch": r.fit.best_epoch,
                        "seconds": time.perf_counter() - t0,
                        "standard_restricted_accuracy": restricted_accuracy(std_model, ds, [a, b])}
            pairs.append({**_cached(runs / f"subtask_{name}_{a}{b}.json", one),
                          "composed_without_fine_tuning": composed_pair(ms, ds, [a, b])})
        methods[name] = {"composed_accuracy": rec["composed_accuracy"],
                         "kernel_retention_all_layers": rec["mean_kernel_retention"],
                         "coupling": module_coupling(flat),
                         # each module on its class's test images, every pair: the reference's for CNNSplitter
                         "activation_cohesion": activation_cohesion(ms, ds.x_test, ds.y_test, ds.info)[0],
                         # a resumed search's wall time covers the resumed part; its own record adds up the calls
                         "split_seconds": rec.get("search_seconds", rec["wall_seconds"]), "subtasks": pairs}
    m = split["mwt"]
    return {"seed": seed, "arch": args.arch, "standard_test_accuracy": std["test_accuracy"], "standard_best_epoch": std["best_epoch"],
            "standard_train_seconds": std["train_seconds"], "mwt_test_accuracy": mwt["test_accuracy"],
            "mwt_test_accuracy_without_generators": mwt["test_accuracy_model_alone"],
            "mwt_best_epoch": mwt["best_epoch"], "mwt_train_seconds": mwt["train_seconds"],
            "kernel_retention": m["kernel_retention"], "cohesion": m["cohesion"], "coupling": m["coupling"],
            "modularize_seconds": m["modularize_seconds"], "methods": methods}


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
        ("cohesion (Jaccard of the generators' masks)", [r["cohesion"] for r in records], ""),
        ("coupling (Jaccard)", [r["coupling"] for r in records], ""),
        ("standard training s", [r["standard_train_seconds"] for r in records], ""),
        ("MwT training + modularizing s", [r["mwt_train_seconds"] + r["modularize_seconds"] for r in records], ""),
    ]
    out = [f"{records[0].get('arch', 'simcnn')}, seeds: {[r['seed'] for r in records]}", "", "| | mean ± std | paper |", "|---|---|---|"]
    out += [f"| {name} | {_ms(v)} | {paper} |" for name, v, paper in rows]
    names = list(dict.fromkeys(n for r in records for n in r["methods"]))
    title = {"mwt": "MwT (modules without generators)", "grad": "GradSplitter (quick)", "ga": "CNNSplitter (narrow)"}
    out += ["", "| method | seeds | kernel retention, all conv layers | composed accuracy | coupling (Jaccard) | "
            "cohesion (active kernels, all pairs) | split s | sub-task module - standard restricted, pt | "
            "sub-task modules composed, no fine-tuning - standard restricted, pt (kernel rate, summed) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        has = [r for r in records if n in r["methods"]]
        ms_ = [r["methods"][n] for r in has]
        d = [100 * (p["module_accuracy"] - p["standard_restricted_accuracy"]) for x in ms_ for p in x["subtasks"]]
        nf = [100 * (p["composed_without_fine_tuning"]["accuracy"] - p["standard_restricted_accuracy"])
              for x in ms_ for p in x["subtasks"]]
        rate = [p["composed_without_fine_tuning"]["kernel_rate"] for x in ms_ for p in x["subtasks"]]
        out.append(f"| {title.get(n, n)} | {[r['seed'] for r in has]} | "
                   f"{_ms([x['kernel_retention_all_layers'] for x in ms_])} | "
                   f"{_ms([x['composed_accuracy'] for x in ms_])} | {_ms([x['coupling'] for x in ms_])} | "
                   f"{_ms([x['activation_cohesion'] for x in ms_])} | "
                   f"{_ms([x['split_seconds'] for x in ms_])} | {_ms(d) if d else 'n/a'} ({sum(v >= 0 for v in d)}/"
                   f"{len(d)} as good or better) | {_ms(nf) if nf else 'n/a'} ({_ms(rate) if rate else 'n/a'}) |")
    out += ["", "| seed | classes | standard restricted | " + " | ".join(title.get(n, n) for n in names) + " |",
            "|---|---|---|" + "---|" * len(names)]
    for r in records:
        for i, p in enumerate(r["methods"]["mwt"]["subtasks"]):
            cells = [(f"{r['methods'][n]['subtasks'][i]['module_accuracy']:.4f} "
                      f"(ret {r['methods'][n]['subtasks'][i]['module_kernel_retention']:.2f})")
                     if n in r["methods"] else "" for n in names]
            out.append(f"| {r['seed']} | {p['classes']} | {p['standard_restricted_accuracy']:.4f} | "
                       + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", default="/tmp/mwt_runs")
    p.add_argument("--out", default="benchmarks/measured/mwt")
    p.add_argument("--arch", default="simcnn", choices=["simcnn", "rescnn"])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--fc-hidden", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--pairs", type=int, nargs="+", default=[0, 3, 6], help="classes whose pairs are sub-tasks")
    p.add_argument("--methods", nargs="*", default=["grad", "ga"], choices=sorted(PRESETS),
                   help="post-training methods run on the standard model for comparison")
    p.add_argument("--method-seeds", type=int, nargs="*", default=None,
                   help="the seeds --methods run for (default: every seed; their searches are the long part)")
    args = p.parse_args()
    records = [run_seed(args, s) for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    ckpt.write_json(out / f"mwt_{args.arch}.json", {"args": vars(args), "records": records, "paper": PAPER,
                                                     "environment": env})
    md = f"{env['cpu']}, {env['cores']} cores, {env['backend']}; " + table(records)
    (out / f"mwt_{args.arch}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
