"""Pan & Rajan's experiments (ICSE 2022, Tables 1-5) with this library, on offline data:
Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and scikit-learn's digits.

    apt-get install dataset-fashion-mnist
    python benchmarks/concern_experiments.py --out results/concern          # everything
    python benchmarks/concern_experiments.py table1 intra_reuse             # some of it

Models are trained into ``--runs`` when absent (or given with ``--strong/--weak/--digits``):
a ResNet-20 (width 0.5) on Fashion-MNIST for ``--strong-epochs`` (the "strong" model), the
same for ``--weak-epochs`` (the "weak" one), and one on digits. Each experiment writes
``OUT/<name>.json`` and ``OUT/<name>.md`` (the measured table next to the paper's figures):

* ``table1``: decomposition cost (top-1 / top-5), module F1, Jaccard index of the weights
  against the model, active positions and time for CI+TI+MC, MC-BLN and MC-BLN + MC-BI,
  under the paper's residual mapping (``conv``) and ours (``sum``: all variants for the
  strong model, CI+TI+MC for the others), and MC-BLN's relative rule on the strong model.
* ``intra_reuse``: 2-class models from two modules of the strong model (6 pairs of 4 random
  classes) vs the same architecture trained from scratch on the pair, keeping its
  best-validation epoch (``--baseline-epochs``).
* ``inter_reuse``: a Fashion-MNIST module + a digits module, without and with continuous
  learning (re-tangling, "MMA"), vs training from scratch.
* ``intra_replace``: each class's module of the weak model's composition replaced by the
  strong model's (top-1 / top-5 change).
* ``inter_replace``: one Fashion-MNIST module of the strong composition replaced by a digits
  module (the new task: 9 Fashion-MNIST classes + one digit), without and with continuous
  learning.

Module outputs are computed once per module set and image set (``module_outputs``), and a
composition is the lab's vote over them (``vote_scores``), which is what ``compose`` runs;
the script checks this equality on a few hundred images once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np

from cnnsplit_jax.compose import Pick, compose, predict_scores
from cnnsplit_jax.data import load_task
from cnnsplit_jax.modules import load_module_set
from cnnsplit_jax.modules.forward import module_outputs
from cnnsplit_jax.modules.heads import vote_scores
from cnnsplit_jax.pipeline import split_run, train_run
from cnnsplit_jax.reuse import continuous_learning, train_from_scratch
from cnnsplit_jax.splitters import ConcernConfig
from cnnsplit_jax.train import RECIPES, TrainConfig

EXPERIMENTS = ("table1", "intra_reuse", "inter_reuse", "intra_replace", "inter_replace")
VARIANTS = {"none": "CI+TI+MC", "bln": "MC-BLN", "bi": "MC-BLN + MC-BI"}
PAPER_TABLE1 = {"none": (3.46, 2.54, 0.50), "bln": (1.77, 0.85, 0.63), "bi": (1.86, 1.93, 0.64)}


def _train(run: Path, dataset: str, epochs: int, seed: int) -> Path:
    if not (run / "train.json").exists():
        cfg = TrainConfig(**{**RECIPES["resnet"], "epochs": epochs, "batch_size": 64, "seed": seed})
        train_run(run, "resnet20", dataset, cfg, width=0.5, recipe="resnet")
    return run


def _split(run: Path, backtrack: str, residual: str = "conv", rule: str = "absolute") -> dict:
    out = run.parent / (f"{run.name}-concern-{residual}-{backtrack}" + ("" if rule == "absolute" else f"-{rule}"))
    if not (out / "split.json").exists():
        split_run(run, out, "concern", ConcernConfig(backtrack=backtrack, residual=residual, bln_rule=rule))
    return {"dir": out, **json.loads((out / "split.json").read_text())}


def _vote(outs, y) -> dict:
    """outs: [(scores [n], positive [n])] per task label -> top-1 / top-5 of the lab's vote."""
    s = np.asarray(vote_scores(np.stack([o[0] for o in outs], 1), np.stack([o[1] for o in outs], 1)))
    top5 = np.argsort(-s, 1)[:, :5]
    return {"top1": float((s.argmax(1) == y).mean()), "top5": float((top5 == y[:, None]).any(1).mean())}


class Outputs:
    """Module outputs per (module set, image set), computed once."""

    def __init__(self):
        self.cache = {}

    def __call__(self, ms, tag: str, x, c: int):
        key = (id(ms), tag)
        if key not in self.cache:
            s, p = module_outputs(ms, x)
            self.cache[key] = (np.asarray(s), np.asarray(p))
        s, p = self.cache[key]
        return s[:, c], p[:, c]


def _write(out: Path, name: str, res, table: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    (out / f"{name}.md").write_text(table + "\n")
    print(table + "\n", flush=True)


def table1(a, runs, out, **_):
    rows, res = [], []
    todo = [(run, m, bt, "absolute") for run in runs.values() for m in ("conv", "sum") for bt in VARIANTS]
    todo += [(runs["strong"], "conv", bt, "relative") for bt in ("bln", "bi")]  # this library's earlier rule
    for run, residual, bt, rule in todo:
        if residual == "sum" and bt != "none" and run != runs["strong"]:
            continue
        r = _split(run, bt, residual, rule)
        f1 = float(np.nanmean(np.asarray(r["module_f1"], float)))
        rec = {"model": run.name, "residual": residual, "variant": bt, "bln_rule": rule, "f1": f1, **{k: r[k] for k in (
            "base_accuracy", "base_top5", "composed_accuracy", "composed_top5", "accuracy_loss", "top5_loss",
            "mean_jaccard_vs_model", "decomposition_seconds")},
            "active_fraction": r["module_size"]["mean_active_fraction"],
            "bln_removed_features": float(np.mean(r["decomposition"]["bln_removed_features"]))}
        res.append(rec)
        name = VARIANTS[bt] + ("" if bt == "none" or rule == "absolute" else f" ({rule})")
        rows.append(f"| {run.name} | {residual} | {name} | {rec['base_accuracy']:.4f} / {rec['base_top5']:.4f} "
                    f"| {100 * rec['accuracy_loss']:.2f} / {100 * rec['top5_loss']:.2f} | {f1:.3f} | "
                    f"{rec['mean_jaccard_vs_model']:.3f} | {rec['active_fraction']:.3f} | "
                    f"{rec['bln_removed_features']:.1f} | {rec['decomposition_seconds']:.1f} |")
    paper = [f"| paper (mean of 9 models) | conv | {VARIANTS[bt]} | | {t1:.2f} / {t5:.2f} | | {ji:.2f} | | | |"
             for bt, (t1, t5, ji) in PAPER_TABLE1.items()]
    table = ("| model | residual | variant | model top-1 / top-5 | cost top-1 / top-5 (pt) | module F1 | "
             "Jaccard of weights vs model | active positions | features removed | decomposition s |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows + paper))
    _write(out, "table1", res, table)


def intra_reuse(a, runs, out, outputs, rng, **_):
    ms = load_module_set(_split(runs["strong"], "bln")["dir"])
    classes = sorted(rng.choice(10, 4, replace=False).tolist())
    res, rows = [], []
    for c1, c2 in itertools.combinations(classes, 2):
        task = load_task(f"fashion_mnist:{c1},{c2}")
        full = load_task("fashion_mnist").ds
        keep = np.isin(full.y_test, [c1, c2])
        comp = _vote([tuple(v[keep] for v in outputs(ms, "fm_test", full.x_test, c)) for c in (c1, c2)],
                     (full.y_test[keep] == c2).astype(int))["top1"]
        cfg = TrainConfig(**{**RECIPES["resnet"], "epochs": a.baseline_epochs, "batch_size": 64, "seed": a.seed})
        base = train_from_scratch(task, "resnet20", 0.5, cfg, key=a.seed)
        res.append({"pair": [c1, c2], "composed": comp, "scratch": base["accuracy"],
                    "scratch_best_epoch": base["best_epoch"], "scratch_seconds": base["train_seconds"]})
        rows.append(f"| {c1},{c2} | {comp:.4f} | {base['accuracy']:.4f} (best epoch {base['best_epoch'] + 1} of "
                    f"{a.baseline_epochs}) | {100 * (comp - base['accuracy']):+.2f} |")
    mean = float(np.mean([r["composed"] - r["scratch"] for r in res]))
    table = (f"Intra-dataset reuse, Fashion-MNIST classes {classes}, modules of the strong model (MC-BLN)\n\n"
             "| pair | composed modules | trained from scratch | difference (pt) |\n|---|---|---|---|\n"
             + "\n".join(rows) + f"\n| mean | | | {100 * mean:+.2f} |\n| paper (mean of 3 datasets) | | | +2.5 |")
    _write(out, "intra_reuse", {"classes": classes, "pairs": res, "mean_difference": mean}, table)


def inter_reuse(a, runs, out, rng, **_):
    fms = load_module_set(_split(runs["strong"], "bln")["dir"])
    dms = load_module_set(_split(runs["digits"], "bln")["dir"])
    res, rows = [], []
    for fc, dc in zip(rng.choice(10, 3, replace=False).tolist(), rng.choice(10, 3, replace=False).tolist()):
        task = load_task(f"fashion_mnist:{fc}+digits:{dc}")
        picks = [Pick(fms, fc), Pick(dms, dc)]
        y = task.ds.y_test
        scores = lambda ps: _vote([tuple(np.asarray(v)[:, 0] for v in module_outputs(p.module_set, task.ds.x_test,  # noqa: E731
                                                                                  classes=[p.source_class]))
                                   for p in ps], y)["top1"]
        plain = scores(picks)
        cl = scores(continuous_learning(picks, task, key=jax.random.key(a.seed)))
        cfg = TrainConfig(**{**RECIPES["resnet"], "epochs": a.baseline_epochs, "batch_size": 64, "seed": a.seed})
        base = train_from_scratch(task, "resnet20", 0.5, cfg, key=a.seed)["accuracy"]
        res.append({"fashion": fc, "digit": dc, "composed": plain, "continuous_learning": cl, "scratch": base,
                    "test_images": int(len(y))})
        rows.append(f"| fashion {fc} + digit {dc} | {plain:.4f} | {cl:.4f} | {base:.4f} | "
                    f"{100 * (base - plain):.2f} / {100 * (base - cl):.2f} |")
    loss = [float(np.mean([r["scratch"] - r[k] for r in res])) for k in ("composed", "continuous_learning")]
    table = ("Inter-dataset reuse: one Fashion-MNIST module + one digits module (MC-BLN)\n\n"
             "| task | composed | + continuous learning | trained from scratch | loss vs scratch (pt) |\n"
             "|---|---|---|---|---|\n" + "\n".join(rows)
             + f"\n| mean | | | | {100 * loss[0]:.2f} / {100 * loss[1]:.2f} |\n| paper (CIFAR-10 + CIFAR-100) | | | | 12.06 / 7.63 |")
    _write(out, "inter_reuse", {"tasks": res, "mean_loss": loss[0], "mean_loss_continuous_learning": loss[1]}, table)


def intra_replace(a, runs, out, outputs, **_):
    strong = load_module_set(_split(runs["strong"], "bln")["dir"])
    weak = load_module_set(_split(runs["weak"], "bln")["dir"])
    ds = load_task("fashion_mnist").ds
    outs = [outputs(weak, "fm_test", ds.x_test, c) for c in range(10)]
    before = _vote(outs, ds.y_test)
    # the vote over module outputs is what `compose` computes: check on a slice once
    n = 300
    want = np.asarray(predict_scores(compose([Pick(weak, c) for c in range(10)]), ds.x_test[:n]))
    got = np.asarray(vote_scores(np.stack([o[0][:n] for o in outs], 1), np.stack([o[1][:n] for o in outs], 1)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    res, rows = [], []
    for c in range(10):
        after = _vote(outs[:c] + [outputs(strong, "fm_test", ds.x_test, c)] + outs[c + 1:], ds.y_test)
        res.append({"class": c, "top1_change": after["top1"] - before["top1"], "top5_change": after["top5"] - before["top5"]})
        rows.append(f"| {c} | {100 * res[-1]['top1_change']:+.2f} | {100 * res[-1]['top5_change']:+.2f} |")
    m1, m5 = (float(np.mean([r[k] for r in res])) for k in ("top1_change", "top5_change"))
    good = [int(sum(r[k] >= 0 for r in res)) for k in ("top1_change", "top5_change")]
    table = (f"Intra-dataset replacement: the weak model's composition (top-1 {before['top1']:.4f} / top-5 "
             f"{before['top5']:.4f}) with one module swapped for the strong model's\n\n"
             "| class | top-1 change (pt) | top-5 change (pt) |\n|---|---|---|\n" + "\n".join(rows)
             + f"\n| mean | {100 * m1:+.2f} | {100 * m5:+.2f} |\n| as good or better | {good[0]}/10 | {good[1]}/10 |"
             "\n| paper (mean) | +0.7 | +1.0 |\n| paper, as good or better | 24/30 | 25/30 |")
    _write(out, "intra_replace", {"before": before, "swaps": res, "mean_top1_change": m1, "mean_top5_change": m5,
                                  "as_good_or_better": good}, table)


def inter_replace(a, runs, out, rng, **_):
    fms = load_module_set(_split(runs["strong"], "bln")["dir"])
    dms = load_module_set(_split(runs["digits"], "bln")["dir"])
    res, rows = [], []

    def outs_of(picks, x):
        return [tuple(np.asarray(v)[:, 0] for v in module_outputs(p.module_set, x, classes=[p.source_class]))
                for p in picks]

    for x, d in zip(rng.choice(10, 3, replace=False).tolist(), rng.choice(10, 3, replace=False).tolist()):
        kept = [c for c in range(10) if c != x]
        task = load_task("fashion_mnist:" + ",".join(map(str, kept)) + f"+digits:{d}")
        y, fm = task.ds.y_test, task.ds.y_test < 9
        picks = [Pick(fms, c) for c in kept] + [Pick(dms, d)]
        rec = {"replaced": x, "digit": d}
        cells = []
        for tag, ps in (("", picks), ("continuous_learning_", continuous_learning(picks, task, key=jax.random.key(a.seed)))):
            outs = outs_of(ps, task.ds.x_test)
            s = np.asarray(vote_scores(np.stack([o[0] for o in outs], 1), np.stack([o[1] for o in outs], 1)))
            new = _vote(outs, y)
            rec.update({f"{tag}top1": new["top1"], f"{tag}top5": new["top5"],
                        f"{tag}fashion_part_top1": float((s.argmax(1) == y)[fm].mean()),
                        f"{tag}digit_recall": float((s.argmax(1) == y)[~fm].mean())})
            cells.append(f"{new['top1']:.4f} / {new['top5']:.4f} | {rec[f'{tag}fashion_part_top1']:.4f}")
        orig = _vote([tuple(v[fm] for v in o) for o in outs_of(picks[:9], task.ds.x_test)], y[fm])
        rec["fashion_part_top1_without_digit_module"] = orig["top1"]
        res.append(rec)
        rows.append(f"| fashion {x} -> digit {d} | {orig['top1']:.4f} | {cells[0]} | {cells[1]} | "
                    f"{rec['digit_recall']:.4f} / {rec['continuous_learning_digit_recall']:.4f} |")
    table = ("Inter-dataset replacement: one Fashion-MNIST module of the strong model replaced by a digits module "
             "(MC-BLN), without and with continuous learning\n\n"
             "| swap | 9 Fashion-MNIST modules alone, top-1 on their images | new task top-1 / top-5 | on Fashion-MNIST images "
             "| + continuous learning: new task top-1 / top-5 | on Fashion-MNIST images | digit recall (plain / CL) |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
             + "\n| paper (CIFAR-10 module -> CIFAR-100 module), vs the trained model | | +2.5 / -7.1 pt | | | | |")
    _write(out, "inter_replace", {"swaps": res}, table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiments", nargs="*", help=f"any of {', '.join(EXPERIMENTS)} (default: all)")
    p.add_argument("--runs", default="runs/concern", help="where models and module sets are kept")
    p.add_argument("--out", default="results/concern")
    p.add_argument("--strong", default=None, help="run dir of a Fashion-MNIST ResNet-20 (trained if absent)")
    p.add_argument("--weak", default=None)
    p.add_argument("--digits", default=None)
    p.add_argument("--strong-epochs", type=int, default=8)
    p.add_argument("--weak-epochs", type=int, default=1)
    p.add_argument("--digits-epochs", type=int, default=30)
    p.add_argument("--baseline-epochs", type=int, default=5, help="from-scratch baselines (best-validation epoch kept)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    unknown = set(a.experiments) - set(EXPERIMENTS)
    if unknown:
        p.error(f"unknown experiment(s) {sorted(unknown)}; expected any of {EXPERIMENTS}")
    runs_dir, out = Path(a.runs), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"strong": _train(Path(a.strong or runs_dir / "fm_r20_strong"), "fashion_mnist", a.strong_epochs, a.seed),
            "weak": _train(Path(a.weak or runs_dir / "fm_r20_weak"), "fashion_mnist", a.weak_epochs, a.seed + 1),
            "digits": _train(Path(a.digits or runs_dir / "digits_r20"), "digits", a.digits_epochs, a.seed)}
    ctx = {"runs": runs, "out": out, "outputs": Outputs()}
    for name in a.experiments or EXPERIMENTS:
        t0 = time.perf_counter()
        globals()[name](a, rng=np.random.default_rng(a.seed), **ctx)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
