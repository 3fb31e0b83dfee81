"""Command-line interface: ``cnnsplit train | info | split | evaluate | compose | patch | replace | demo``.

Library modules never print; this module reports progress (tqdm bars, disabled when stderr
is not a terminal) and writes JSON results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty(), unit="step")


class _EpochBar:
    """One progress bar per epoch: ``step`` opens it lazily and shows live metrics."""

    def __init__(self):
        self.bar = None

    def step(self, total: int, desc: str, metrics: dict) -> None:
        if self.bar is None:
            self.bar = _bar(total, desc)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['acc']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_train(args) -> int:
    import jax

    from . import checkpoint as ckpt
    from .models import build_model
    from .train import RECIPES, TrainConfig, accuracy, check_compatible, fit, summary

    out = Path(args.out)
    state_json = out / "train_state.json"
    if state_json.exists() and not args.resume:
        print(
            f"error: {out} already holds a training run; pass --resume to continue it or "
            f"choose another --out",
            file=sys.stderr,
        )
        return 2
    ds, sources = _train_data(args.dataset, args.data_dir)
    model = build_model(
        args.model,
        num_classes=ds.info.num_classes,
        in_channels=ds.info.channels,
        width=args.width,
        key=jax.random.key(args.seed),
        **({"fc_hidden": args.fc_hidden} if args.fc_hidden and args.model == "simcnn" else {}),
    )
    check_compatible(model, ds.info)
    given = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay",
                                           "lr_gamma", "augment", "patience")
             if getattr(args, k) is not None}
    if args.lr_milestones is not None:
        given["lr_milestones"] = tuple(args.lr_milestones)
    recipe = args.recipe or ("resnet" if args.model.startswith("resnet") else "reference")
    cfg = TrainConfig(**{**RECIPES[recipe], **given,
                         "dirichlet_alpha": args.dirichlet_alpha,
                         "dirichlet_min_size": args.dirichlet_min_size, "seed": args.seed})
    out.mkdir(parents=True, exist_ok=True)
    counts = summary(model)
    print(
        f"training {args.model} (width {args.width}, {counts['num_kernels']} kernels, "
        f"{counts['num_params']:,} params) on {args.dataset} "
        f"({len(ds.y_train)} train / {len(ds.y_test)} test images) for {cfg.epochs} epochs",
        file=sys.stderr,
    )
    bar = _EpochBar()
    n_steps = -(-int(len(ds.y_train) * (1 - cfg.val_fraction)) // cfg.batch_size)

    def on_step(epoch, s, m):
        bar.step(n_steps, f"epoch {epoch + 1}/{cfg.epochs}", m)

    def on_epoch(epoch, rec):
        bar.close()
        print(
            f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {rec['train_loss']:.4f}  "
            f"train acc {rec['train_accuracy']:.4f}  val acc {rec['val_accuracy']:.4f}  "
            f"[{rec['seconds']:.1f}s]",
            file=sys.stderr,
        )

    res = fit(model, ds, cfg, run_dir=out, resume=args.resume, on_step=on_step, on_epoch=on_epoch)
    t0 = time.perf_counter()
    test_acc = accuracy(res.model, ds.x_test, ds.y_test, ds.info)
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "width": args.width,
        "num_classes": ds.info.num_classes,
        "in_channels": ds.info.channels,
        "num_kernels": counts["num_kernels"],
        "num_params": counts["num_params"],
        "test_accuracy": test_acc,
        "val_accuracy": res.best_val_accuracy,
        "best_epoch": res.best_epoch,
        "epochs": cfg.epochs,
        "train_seconds": res.train_seconds,
        "eval_seconds": time.perf_counter() - t0,
        "normalization": {"mean": list(ds.info.mean), "std": list(ds.info.std)},
        "class_names": list(ds.info.class_names),
        "seed": args.seed,
        "config": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "backend": jax.default_backend(),
    }
    ckpt.save_model(
        out,
        res.model,
        {
            "dataset": args.dataset,
            "sources": sources,
            "normalization": result["normalization"],
            "class_names": result["class_names"],
            "test_accuracy": test_acc,
            "val_accuracy": res.best_val_accuracy,
            "seed": args.seed,
            "split": {
                "seed": args.seed,
                "val_fraction": cfg.val_fraction,
                "dirichlet_alpha": cfg.dirichlet_alpha,
                "dirichlet_min_size": cfg.dirichlet_min_size,
            },
        },
    )
    ckpt.write_json(out / "train.json", result)
    print(f"test accuracy {test_acc:.4f}; wrote {out / 'train.json'}", file=sys.stderr)
    return 0


def _cmd_info(args) -> int:
    from . import checkpoint as ckpt
    from .masks import mask_points
    from .train import summary

    run = Path(args.run_dir)
    model, meta = ckpt.load_model(run)
    counts = summary(model)
    train = ckpt.read_json(run / "train.json") if (run / "train.json").is_file() else {}
    rows = [
        ("model", model.arch),
        ("width", model.width),
        ("classes", model.num_classes),
        ("input channels", model.in_channels),
        ("kernels", counts["num_kernels"]),
        ("parameters", f"{counts['num_params']:,}"),
        ("dataset", meta.get("dataset", "?")),
        ("test accuracy", meta.get("test_accuracy", "?")),
        ("train seconds", round(train["train_seconds"], 1) if "train_seconds" in train else "?"),
    ]
    for k, v in rows:
        print(f"{k:>16}: {v}")
    if hasattr(model, "nodes"):  # ResNets: the position nodes concern identification masks
        nodes = model.nodes()
        print(f"{'nodes':>16}: {len(nodes)} ({sum(n.size for n in nodes):,} positions): "
              + ", ".join(f"{n.name}{list(n.shape)}" for n in nodes))
    else:
        print(f"{'mask points':>16}: " + ", ".join(f"{p.name}[{p.size}]" + ("x" + str(len(p.layers)) if len(p.layers) > 1 else "") for p in mask_points(model)))
    if args.json:
        print(json.dumps({**meta, **counts}, indent=2))
    return 0


# ------------------------------------------------------------------------ data of runs
def _is_task_spec(spec: str) -> bool:
    return ":" in spec or "+" in spec


def _train_data(spec: str, data_dir):
    """(Dataset, [[dataset, class], ...]) for a dataset name or a task spec (``data.parse_task``)."""
    from .data import load_dataset, load_task

    if not _is_task_spec(spec):
        ds = load_dataset(spec, data_dir)
        return ds, [[ds.info.name, c] for c in range(ds.info.num_classes)]
    task = load_task(spec, data_dir)
    return task.ds, [list(x) for x in task.sources]


def _run_data(meta: dict, data_dir=None):
    """Everything a run's dataset spec gives: (ds, (tr, va) train indices, (x, y) module-eval
    images, (x, y) final-test images). Plain datasets use the reference's test split (first
    20% / last 80%); task specs the per-part split of ``data.make_task``."""
    from .data import load_dataset, load_task

    spec = meta["dataset"]
    if not _is_task_spec(spec):
        ds = load_dataset(spec, data_dir or meta.get("data_dir"))
        tr, va, ev, te = _splits_for(meta, ds)
        return ds, (tr, va), (ds.x_test[ev], ds.y_test[ev]), (ds.x_test[te], ds.y_test[te])
    task = load_task(spec, data_dir or meta.get("data_dir"))
    tr, va, _, _ = _splits_for(meta, task.ds)
    return task.ds, (tr, va), (task.x_eval, task.y_eval), (task.ds.x_test, task.ds.y_test)


# ------------------------------------------------------------------------ split / evaluate
def _splits_for(meta: dict, ds):
    """The base model's train/val split and the test set's module-eval/test split."""
    from .data import test_splits
    from .train import split_indices

    sp = meta.get("split", {"seed": meta.get("seed", 0), "val_fraction": 0.2})
    tr, va = split_indices(ds.y_train, sp["seed"], sp.get("val_fraction", 0.2),
                           sp.get("dirichlet_alpha"), sp.get("dirichlet_min_size", 100))
    ev, te = test_splits(len(ds.y_test))
    return tr, va, ev, te


def _report_table(res: dict, class_names) -> str:
    lines = ["| class | precision | recall | F1 | kernel retention |", "|---|---|---|---|---|"]
    for c, name in enumerate(class_names):
        lines.append(
            f"| {name} | {res['module_precision'][c]:.3f} | {res['module_recall'][c]:.3f} | "
            f"{res['module_f1'][c]:.3f} | {res['kernel_retention'][c]:.3f} |"
        )
    lines.append("")
    lines.append(
        f"base accuracy {res['base_accuracy']:.4f} | composed accuracy {res['composed_accuracy']:.4f} "
        f"| mean kernel retention {res['mean_kernel_retention']:.3f} | mean Jaccard {res['mean_jaccard']:.3f}"
        + (f" | mean module FLOPs {np.mean(res['module_flops_ratio']):.3f} of the base" if "module_flops_ratio" in res else "")
    )
    return "\n".join(lines)


def _write_plots(out: Path, res: dict, history, class_names, selected):
    from . import plots

    plots.retention_heatmap(res["layer_retention"], out / "retention_heatmap.png", class_names)
    plots.f1_bars(res["module_f1"], out / "module_f1.png", class_names)
    if history:
        plots.accuracy_vs_kernels(history, out / "accuracy_vs_kernels.png",
                                  res.get("base_val_accuracy", res["base_accuracy"]), selected)


def _split_setup(model_dir: Path, out: Path, resume: bool, progress_file: str, method: str = "grad"):
    """Shared start of every split: the base model, its data, checks against overwriting."""
    from . import checkpoint as ckpt

    model, meta = ckpt.load_model(model_dir)
    resnet = hasattr(model, "nodes")
    if resnet != (method == "concern"):
        raise ValueError(f"--method {method} does not apply to {model.arch}: ResNets (resnet20/32/56) are "
                         "decomposed with --method concern, the other models with --method grad or ga")
    ds, (tr, va), eval_split, test_split = _run_data(meta)
    if ds.info.num_classes != model.num_classes:
        raise ValueError(f"class count mismatch: model has {model.num_classes} classes, dataset has {ds.info.num_classes}")
    if (out / progress_file).exists() and not resume:
        raise ckpt.CheckpointError(f"{out} already holds a search; pass --resume to continue it or choose another --out")
    norm = meta.get("normalization", {"mean": list(ds.info.mean), "std": list(ds.info.std)})
    return model, meta, ds, (tr, va), eval_split, test_split, norm


def _module_meta(method: str, meta: dict, ds, norm: dict, model_dir: Path, **extra) -> dict:
    """modules.json fields every module set carries (dataset, classes, split, base run)."""
    return {
        "method": method, "dataset": meta["dataset"], "normalization": norm,
        "class_names": list(ds.info.class_names),
        "sources": meta.get("sources") or [[ds.info.name, c] for c in range(ds.info.num_classes)],
        "split": meta.get("split", {"seed": meta.get("seed", 0), "val_fraction": 0.2}),
        "base_run": str(model_dir), **extra,
    }


def _run_grad_split(model_dir: Path, out: Path, cfg, *, resume: bool, train_subset=None, quiet=False):
    """Search, select, save, evaluate and plot; returns the split.json dict."""
    import jax

    from . import checkpoint as ckpt
    from . import gradsplitter as gs
    from .evaluate import evaluate_module_set
    from .heads import Heads
    from .module_set import ModuleSet, save_module_set

    model, meta, ds, (tr, va), eval_split, test_split, norm = _split_setup(model_dir, out, resume, "search.json", "grad")
    if train_subset:
        tr = tr[:train_subset]
    phases = gs.phase_schedule(cfg)
    steps = -(-len(tr) // cfg.batch_size)
    if not quiet:
        print(f"GradSplitter on {model.arch} ({meta['dataset']}): {len(phases)} epochs x {steps} steps, "
              f"{model.num_classes} modules per jitted step", file=sys.stderr)
    bar = _EpochBar()

    def on_step(epoch, s, n, m):
        bar.step(n, f"epoch {epoch + 1}/{len(phases)} ({'mod' if phases[epoch] else 'head'})", m)

    def on_epoch(epoch, rec):
        bar.close()
        if not quiet:
            print(f"epoch {epoch + 1:3d}/{len(phases)} {rec['phase']:>10}  loss {rec['loss']:.4f}  "
                  f"val acc {rec['val_accuracy']:.4f}  kept kernels {rec['mean_kernels']:.0f} "
                  f"({rec['mean_retention']:.3f})  [{rec['seconds']:.1f}s]", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    res = gs.run(model, (ds.x_train[tr], ds.y_train[tr]), (ds.x_train[va], ds.y_train[va]),
                 norm["mean"], norm["std"], cfg, key=jax.random.key(cfg.seed), out_dir=out,
                 resume=resume, on_step=on_step, on_epoch=on_epoch)
    sel = gs.select_epoch(res.history, res.base_val_accuracy, cfg.select_tolerance)
    masks = {k: v[sel].astype(np.float32) for k, v in res.masks_history.items()}
    heads = Heads(*(h[sel] for h in res.heads_history))
    ms = ModuleSet(model, masks, heads, _module_meta(
        "grad", meta, ds, norm, model_dir, selected_epoch=sel, config={k: v for k, v in cfg.__dict__.items()}))
    save_module_set(out, ms)
    ev_res = evaluate_module_set(ms, eval_split, test_split, ds.info)
    result = {
        "method": "grad",
        "model": model.arch,
        "dataset": meta["dataset"],
        **ev_res,
        "selected_epoch": sel,
        "base_val_accuracy": res.base_val_accuracy,
        "selected_val_accuracy": res.history[sel]["val_accuracy"],
        "search_seconds": res.search_seconds,
        "epochs": len(res.history),
        "history": res.history,
        "train_images": int(len(tr)),
        "val_images": int(len(va)),
        "config": ms.meta["config"],
    }
    ckpt.write_json(out / "split.json", result)
    _write_plots(out, result, res.history, list(ds.info.class_names), sel)
    return result


def _run_ga_split(model_dir: Path, out: Path, cfg, *, resume: bool):
    """CNNSplitter search, save the module set (class-logit modules), evaluate, plot."""
    from . import checkpoint as ckpt
    from . import cnnsplitter as cs
    from . import plots
    from .evaluate import evaluate_module_set
    from .module_set import ModuleSet, save_module_set

    model, meta, ds, (tr, va), eval_split, test_split, norm = _split_setup(model_dir, out, resume, "ga.json", "ga")
    print(f"CNNSplitter on {model.arch} ({meta['dataset']}): {model.num_classes} classes x population "
          f"{cfg.population}, {cfg.generations} generations, {len(va)} search images", file=sys.stderr)
    bar = _bar(cfg.generations + 1, "generations")

    def on_generation(g, rec):
        bar.update(1)
        bar.set_postfix(fit=f"{rec['best_fitness']:.3f}", acc=f"{rec['accuracy']:.3f}",
                        kept=f"{rec['mean_kept_kernels']:.0f}")
        print(f"generation {g:3d}  best fitness {rec['best_fitness']:.4f}  accuracy {rec['accuracy']:.4f}  "
              f"diff {rec['diff']:.3f}  kept kernels {rec['mean_kept_kernels']:.0f}  [{rec['seconds']:.1f}s]",
              file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    res = cs.run(model, (ds.x_train[va], ds.y_train[va]), norm["mean"], norm["std"], cfg, out_dir=out,
                 resume=resume, on_generation=on_generation)
    bar.close()
    ms = ModuleSet(model, res.masks, None, _module_meta(
        "ga", meta, ds, norm, model_dir, best_generation=res.best_generation, config=cs._cfg_json(cfg)))
    save_module_set(out, ms)
    ev_res = evaluate_module_set(ms, eval_split, test_split, ds.info)
    result = {
        "method": "ga", "model": model.arch, "dataset": meta["dataset"], **ev_res,
        "best_generation": res.best_generation,
        "generations": len(res.history),
        "best_fitness": [h["best_fitness"] for h in res.history],
        "history": res.history,
        "sensitivity": res.sensitivity,
        "sensitive_layers": list(res.sensitive),
        "search_seconds": res.search_seconds,
        "phase_seconds": res.phase_seconds,
        "search_images": int(len(va)),
        "config": cs._cfg_json(cfg),
    }
    ckpt.write_json(out / "split.json", result)
    _write_plots(out, result, None, list(ds.info.class_names), None)
    plots.fitness_over_generations(res.history, out / "fitness.png", res.best_generation)
    return result


def _concern_table(res: dict, class_names) -> str:
    size = res["module_size"]
    lines = ["| class | precision | recall | F1 | active positions |", "|---|---|---|---|---|"]
    for c, name in enumerate(class_names):
        lines.append(f"| {name} | {res['module_precision'][c]:.3f} | {res['module_recall'][c]:.3f} | "
                     f"{res['module_f1'][c]:.3f} | {size['active_fraction'][c]:.3f} |")
    lines.append("")
    lines.append(
        f"model top-1 {res['base_accuracy']:.4f} / top-5 {res['base_top5']:.4f} | composed top-1 "
        f"{res['composed_accuracy']:.4f} / top-5 {res['composed_top5']:.4f} | decomposition cost "
        f"{100 * res['accuracy_loss']:.2f} / {100 * res['top5_loss']:.2f} pt | mean Jaccard "
        f"{res['mean_jaccard']:.3f} (vs model {res['mean_jaccard_vs_model']:.3f}) | module params "
        f"{size['module_params']:,} (model {size['model_params']:,}: no weight removed)")
    return "\n".join(lines)


def _run_concern_split(model_dir: Path, out: Path, cfg, *, quiet: bool = False):
    """Concern identification (Pan & Rajan): decompose, save the module set, evaluate, plot."""
    import dataclasses

    from . import checkpoint as ckpt
    from . import plots
    from .concern import decompose, energy_estimate
    from .evaluate import evaluate_concern_set
    from .module_set import ConcernModuleSet, save_module_set

    model, meta, ds, (tr, va), eval_split, test_split, norm = _split_setup(model_dir, out, False, "split.json", "concern")
    x, y = ds.x_train[tr], ds.y_train[tr]
    if not quiet:
        print(f"concern identification on {model.arch} ({meta['dataset']}): {model.num_classes} modules "
              f"from {len(y)} training images (negatives {cfg.negative_ratio}:1, backtrack {cfg.backtrack})",
              file=sys.stderr)
    bar = _bar(1, "forward batches")

    def on_batch(i, n):
        bar.total = n
        bar.update(1)

    dec = decompose(model, x, y, norm["mean"], norm["std"], cfg, on_batch=on_batch)
    bar.close()
    cfg_json = dataclasses.asdict(cfg)
    ms = ConcernModuleSet(model, dec.inactive, dec.head_w, dec.head_b, dec.removed_features,
                          _module_meta("concern", meta, ds, norm, model_dir, config=cfg_json))
    out.mkdir(parents=True, exist_ok=True)
    save_module_set(out, ms)
    ev = evaluate_concern_set(ms, eval_split, test_split, ds.info)
    result = {"method": "concern", "model": model.arch, "dataset": meta["dataset"], **ev,
              "decomposition": dec.stats, "decomposition_seconds": dec.stats["seconds"],
              "energy": energy_estimate(dec.stats["seconds"]), "config": cfg_json}
    ckpt.write_json(out / "split.json", result)
    plots.f1_bars(result["module_f1"], out / "module_f1.png", list(ds.info.class_names))
    return result


def _cmd_split(args) -> int:
    from .gradsplitter import GradSplitterConfig

    if args.method == "concern":
        from .concern import ConcernConfig

        cfg = ConcernConfig(concerned_per_class=args.concerned_per_class, negative_ratio=args.negative_ratio,
                            backtrack=args.backtrack, delta=args.delta, seed=args.seed)
        res = _run_concern_split(Path(args.model_dir), Path(args.out), cfg)
        print(_concern_table(res, _class_names(Path(args.out))))
        print(f"decomposed in {res['decomposition_seconds']:.1f} s; wrote {Path(args.out) / 'split.json'}",
              file=sys.stderr)
        return 0
    if args.method == "ga":
        from .cnnsplitter import CNNSplitterConfig

        cfg = CNNSplitterConfig(
            population=args.population, generations=args.generations, groups=args.groups,
            mutation_percent=args.mutation_rate, eval_images=args.eval_images, seed=args.seed,
            sensitivity_images=args.sensitivity_images,
            early_stop=args.early_stop, algorithm=args.algorithm,
            sensitive=None if args.sensitive is None else tuple(x for x in args.sensitive.split(",") if x),
            num_parents=min(50, args.population), keep_parents=min(20, args.population),
            **({"sensitive_ratios": tuple(float(v) for v in args.sensitive_ratios.split(","))}
               if args.sensitive_ratios else {}),
            **({"other_ratios": tuple(float(v) for v in args.other_ratios.split(","))}
               if args.other_ratios else {}),
        )
        res = _run_ga_split(Path(args.model_dir), Path(args.out), cfg, resume=args.resume)
        print(_report_table(res, _class_names(Path(args.out))))
        print(f"best generation {res['best_generation']} of {res['generations'] - 1}; "
              f"wrote {Path(args.out) / 'split.json'} and plots", file=sys.stderr)
        return 0
    cfg = GradSplitterConfig(
        alpha=args.alpha, head_epochs=args.head_epochs, modularity_epochs=args.modularity_epochs,
        lr_head=args.lr_head, lr_modularity=args.lr_modularity, batch_size=args.batch_size,
        init=args.init, seed=args.seed, select_tolerance=args.select_tolerance,
    )
    res = _run_grad_split(Path(args.model_dir), Path(args.out), cfg, resume=args.resume,
                          train_subset=args.train_subset)
    print(_report_table(res, _class_names(Path(args.out))))
    print(f"wrote {Path(args.out) / 'split.json'} and plots", file=sys.stderr)
    return 0


def _class_names(mod_dir: Path):
    from .checkpoint import read_json

    return read_json(mod_dir / "modules.json")["class_names"]


def _cmd_evaluate(args) -> int:
    from . import checkpoint as ckpt
    from .evaluate import evaluate_module_set
    from .module_set import ConcernModuleSet, load_module_set

    mod = Path(args.mod_dir)
    ms = load_module_set(mod)
    ds, _, eval_split, test_split = _run_data({**ms.meta, "dataset": args.dataset or ms.meta["dataset"]},
                                              args.data_dir)
    if ds.info.num_classes != ms.num_modules:
        raise ValueError(f"class count mismatch: {ms.num_modules} modules, dataset {ds.info.name!r} has {ds.info.num_classes} classes")
    names = ms.meta.get("class_names", [str(i) for i in range(ms.num_modules)])
    if isinstance(ms, ConcernModuleSet):
        from . import plots
        from .evaluate import evaluate_concern_set

        res = {"method": "concern", "dataset": ds.info.name,
               **evaluate_concern_set(ms, eval_split, test_split, ds.info)}
        ckpt.write_json(mod / "evaluate.json", res)
        plots.f1_bars(res["module_f1"], mod / "module_f1.png", names)
        print(_concern_table(res, names))
        print(f"wrote {mod / 'evaluate.json'}", file=sys.stderr)
        return 0
    res = evaluate_module_set(ms, eval_split, test_split, ds.info)
    res = {"method": ms.meta.get("method"), "dataset": ds.info.name, **res}
    ckpt.write_json(mod / "evaluate.json", res)
    _write_plots(mod, res, None, ms.meta.get("class_names"), None)
    print(_report_table(res, names))
    print(f"wrote {mod / 'evaluate.json'}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------ compose / patch
def _parse_modules(spec: str):
    """``MOD_DIR[:CLASSES]`` -> (path, classes or None)."""
    import re

    from .data import parse_classes

    path, sep, tail = spec.rpartition(":")
    if sep and re.fullmatch(r"[0-9,\- ]+", tail):
        return path, parse_classes(tail)
    return spec, None


def _load_sources(specs):
    from .module_set import load_module_set
    from .reuse import Source

    out = []
    for spec in specs:
        path, classes = _parse_modules(spec)
        out.append(Source(path, load_module_set(path), classes))
    return out


def _task_for(sources, dataset: str | None, data_dir):
    """The task a composition is evaluated on: ``--dataset`` (a name: the classes the module
    sets cover; a task spec: as given) or, without it, every class the module sets cover,
    grouped by dataset in order of appearance."""
    from .data import load_task

    covered: dict[str, list[int]] = {}
    for s in sources:
        for c in s.classes:
            d, k = s.origins[c]
            if k not in covered.setdefault(d, []):
                covered[d].append(k)
    if dataset and _is_task_spec(dataset):
        spec = dataset
    else:
        if dataset:
            if dataset not in covered:
                raise ValueError(f"no module set covers dataset {dataset!r} (they cover {sorted(covered)})")
            covered = {dataset: covered[dataset]}
        spec = "+".join(f"{d}:{','.join(map(str, sorted(ks)))}" for d, ks in covered.items())
    return spec, load_task(spec, data_dir)


def _class_table(rep: dict) -> str:
    lines = ["| class | precision | recall | F1 |", "|---|---|---|---|"]
    for n, p, r, f in zip(rep["class_names"], rep["precision"], rep["recall"], rep["f1"]):
        lines.append(f"| {n} | {p:.3f} | {r:.3f} | {f:.3f} |")
    return "\n".join(lines)


def _cmd_compose(args) -> int:
    from . import checkpoint as ckpt
    from . import plots
    from .reuse import compose_task, train_from_scratch
    from .train import TrainConfig

    out = Path(args.out)
    sources = _load_sources(args.modules)
    spec, task = _task_for(sources, args.dataset, args.data_dir)
    print(f"composing {task.ds.info.num_classes} classes of {spec} from {len(sources)} module set(s)",
          file=sys.stderr)
    res, picks = compose_task(sources, task, form=args.form, execution=args.execution)
    res = {"task": spec, "form": args.form, "execution": args.execution, **res}
    if args.continuous_learning:
        import jax

        from .reuse import continuous_learning, evaluate_picks

        cl = continuous_learning(picks, task, key=jax.random.key(args.seed))
        res["continuous_learning"] = evaluate_picks(cl, task, form=args.form, execution=args.execution)
    if args.baseline_epochs:
        from .train import RECIPES

        base = picks[0].module_set.base
        recipe = RECIPES["resnet"] if base.arch.startswith("resnet") else {}
        cfg = TrainConfig(**{**recipe, "epochs": args.baseline_epochs, "batch_size": 64, "lr_milestones": (),
                             "patience": 5, "seed": args.seed})
        print(f"training the baseline {base.arch} (width {base.width}) from scratch for up to "
              f"{cfg.epochs} epochs", file=sys.stderr)
        kw = {"fc_hidden": base.fc_hidden} if hasattr(base, "fc_hidden") else {}
        res["baseline"] = train_from_scratch(task, base.arch, base.width, cfg, key=args.seed, **kw)
        res["training_seconds_saved"] = res["baseline"]["train_seconds"] - res["compose_seconds"]
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "compose.json", res)
    plots.confusion_matrix(res["confusion"], out / "confusion.png", res["class_names"],
                           f"composed model ({res['accuracy']:.3f})")
    print(_class_table(res))
    print("\n| source | base model accuracy | its own modules |\n|---|---|---|")
    for s in res["sources"]:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"| {s['source']} | {fmt(s['base_accuracy'])} | {fmt(s.get('modules_accuracy'))} |")
    print(f"\ncomposed accuracy {res['accuracy']:.4f} on {res['images']} test images "
          f"(modules chosen by F1 on {res['eval_images']} images)")
    if "continuous_learning" in res:
        print(f"after continuous learning (tangling re-run against the other datasets): "
              f"{res['continuous_learning']['accuracy']:.4f}")
    if "baseline" in res:
        b = res["baseline"]
        print(f"trained from scratch: accuracy {b['accuracy']:.4f} in {b['train_seconds']:.1f}s; "
              f"composing took {res['compose_seconds']:.1f}s")
    print(f"wrote {out / 'compose.json'} and {out / 'confusion.png'}", file=sys.stderr)
    return 0


def _patch_table(res: dict) -> str:
    lines = ["| | TC precision | TC recall | TC F1 | non-TC accuracy |", "|---|---|---|---|---|"]
    for key in ("before", "after"):
        r = res[key]
        lines.append(f"| {key} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['accuracy']:.4f} |")
    return "\n".join(lines)


def _cmd_patch(args) -> int:
    from . import checkpoint as ckpt
    from . import plots
    from .data import DatasetInfo
    from .reuse import patch

    weak, meta = ckpt.load_model(Path(args.weak))
    (src,) = _load_sources([args.modules])
    k = int(args.target_class)
    if not 0 <= k < src.module_set.num_modules:
        raise ValueError(f"unknown class index {k}; {args.modules} has classes 0..{src.module_set.num_modules - 1}")
    weak_sources = [tuple(x) for x in meta.get("sources") or []]
    if weak_sources and weak_sources[-1] != src.origins[k]:
        raise ValueError(
            f"the weak model's last (target) class is {weak_sources[-1]} but module {k} of "
            f"{args.modules} recognises {src.origins[k]}; train the weak model with the target class last")
    if weak.num_classes != len(meta.get("class_names", [])) and meta.get("class_names"):
        raise ValueError("weak model metadata and weights disagree on the class count")
    _, _, _, (x_test, y_test) = _run_data(meta, args.data_dir)
    # the module's score range comes from its target-class images of its base model's
    # validation split (the reference's module_output_collector)
    ms_meta = dict(src.module_set.meta)
    if "split" not in ms_meta and ms_meta.get("base_run"):
        try:
            ms_meta["split"] = ckpt.read_json(Path(ms_meta["base_run"]) / "model.json")["split"]
        except (OSError, KeyError, ckpt.CheckpointError):
            pass
    if "split" not in ms_meta:
        raise ValueError(f"{args.modules} does not record its base model's train/val split; re-run the split")
    mds, (_, va), _, _ = _run_data(ms_meta, args.data_dir)
    x_va, y_va = mds.x_train[va], mds.y_train[va]
    norm = meta["normalization"]
    names = tuple(meta.get("class_names") or map(str, range(weak.num_classes)))
    info = DatasetInfo(meta["dataset"], names, weak.in_channels, tuple(norm["mean"]), tuple(norm["std"]))
    res = patch(weak, info, x_test, y_test, src.module_set, k, x_va[y_va == k])
    res = {"weak": args.weak, "modules": args.modules, **res}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "patch.json", res)
    plots.confusion_matrix(res["confusion_before"], out / "confusion_before.png", list(names), "weak model")
    plots.confusion_matrix(res["confusion_after"], out / "confusion_after.png", list(names), "patched")
    print(_patch_table(res))
    print(f"wrote {out / 'patch.json'} and confusion PNGs", file=sys.stderr)
    return 0


def _cmd_replace(args) -> int:
    from . import checkpoint as ckpt
    from . import plots
    from .compose import Pick
    from .reuse import replace, select_picks

    sources = _load_sources(args.modules)
    (new,) = _load_sources([args.with_])
    k = int(args.class_)
    if not 0 <= k < new.module_set.num_modules:
        raise ValueError(f"unknown class index {k}; {args.with_} has classes 0..{new.module_set.num_modules - 1}")
    spec, task = _task_for(sources, args.dataset, args.data_dir)
    picks, _ = select_picks(sources, task)
    origin = new.origins[k]
    cols = [t for t, o in enumerate(task.sources) if tuple(o) == origin]
    if not cols:
        raise ValueError(f"module {k} of {args.with_} recognises {origin}, which is not a class of {spec}")
    res = replace(picks, cols[0], Pick(new.module_set, k, new.label), task,
                  form=args.form, execution=args.execution)
    res = {"task": spec, **res}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "replace.json", res)
    for key in ("before", "after"):
        plots.confusion_matrix(res[key]["confusion"], out / f"confusion_{key}.png",
                               res[key]["class_names"], f"{key} ({res[key]['accuracy']:.3f})")
    print(f"class {res['class']}: {res['old_source']} -> {res['new_source']}")
    print(f"accuracy {res['before']['accuracy']:.4f} -> {res['after']['accuracy']:.4f}; "
          f"F1 of the class {res['before']['f1'][cols[0]]:.3f} -> {res['after']['f1'][cols[0]]:.3f}")
    print(f"wrote {out / 'replace.json'}", file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    """Train a narrow SimCNN on digits, split it with GradSplitter, evaluate, compose the
    extracted modules, and patch a deliberately weak model with one module."""
    import contextlib
    import io
    import time as _t

    from .gradsplitter import GradSplitterConfig

    out = Path(args.out)
    run = out / "base"
    t0 = _t.perf_counter()
    if not (run / "train.json").exists():
        rc = main(["train", "--model", "simcnn", "--dataset", "digits", "--width", "0.125",
                   "--epochs", "12", "--batch-size", "64", "--lr", "0.05", "--lr-milestones", "0.75",
                   "--seed", str(args.seed), "--out", str(run)])
        if rc:
            return rc
    cfg = GradSplitterConfig(head_epochs=2, modularity_epochs=args.modularity_epochs,
                             lr_modularity=0.02, seed=args.seed)
    mod = out / "modules"
    resume = (mod / "search.json").exists()
    res = _run_grad_split(run, mod, cfg, resume=resume)
    print("\n## cnnsplit demo: GradSplitter on a narrow SimCNN, digits\n")
    print(_report_table(res, _class_names(mod)))
    print(f"\nselected epoch {res['selected_epoch']} of {res['epochs']}; search {res['search_seconds']:.1f}s")

    # composition of the physically extracted modules (one jitted call for all ten)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        rc = main(["compose", "--modules", str(mod), "--form", "extracted", "--out", str(out / "compose")])
    if rc:
        return rc
    comp = json.loads((out / "compose" / "compose.json").read_text())
    print(f"\n## composition of the 10 extracted modules\n\naccuracy {comp['accuracy']:.4f} on "
          f"{comp['images']} test images (masked modules: {res['composed_accuracy']:.4f})")

    # patching: a weak model (CNNSplitter's weak SimCNN, 2 epochs) whose last class is digit 3
    weak = out / "weak"
    with contextlib.redirect_stdout(quiet):
        if not (weak / "train.json").exists():
            rc = main(["train", "--model", "simcnn_weak", "--recipe", "weak", "--dataset", "digits:0-2,4-9,3",
                       "--width", "0.125", "--epochs", "2", "--batch-size", "64", "--seed", str(args.seed),
                       "--out", str(weak)])
            if rc:
                return rc
        rc = main(["patch", "--weak", str(weak), "--modules", str(mod), "--target-class", "3",
                   "--out", str(out / "patch")])
    if rc:
        return rc
    pt = json.loads((out / "patch" / "patch.json").read_text())
    print("\n## patching a weak model's class 3 with module 3\n")
    print(_patch_table(pt))
    print(f"\ntotal {(_t.perf_counter() - t0):.1f}s; results: {mod / 'split.json'}, "
          f"{out / 'compose' / 'compose.json'}, {out / 'patch' / 'patch.json'}; plots: PNGs next to them")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import ARCHITECTURES

    p = argparse.ArgumentParser(prog="cnnsplit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a base model")
    t.add_argument("--model", required=True, choices=sorted(ARCHITECTURES))
    t.add_argument("--dataset", required=True,
                   help=f"one of {sorted(DATASETS)}, or a task NAME:CLASSES[+NAME:CLASSES] "
                        "(e.g. digits:0-8 or fashion_mnist:0,1+digits:3); labels follow the order given")
    t.add_argument("--data-dir", default=None, help="where dataset files live (else $CNNSPLIT_DATA)")
    t.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    t.add_argument("--fc-hidden", type=int, default=None, help="SimCNN FC width (default 4096*width)")
    t.add_argument("--recipe", default=None, choices=["reference", "weak", "poor-fit", "resnet"],
                   help="hyper-parameter preset: the papers' training (default; 'resnet' for "
                        "resnet20/32/56: Adam 1e-3 as Pan & Rajan's Keras models), CNNSplitter's weak "
                        "models, or its poor-fit models (plain SGD, no augmentation or dropout, "
                        "final epoch kept); the flags below override it")
    t.add_argument("--epochs", type=int, default=None, help="default 200 (weak: 100)")
    t.add_argument("--batch-size", type=int, default=None, help="default 128")
    t.add_argument("--lr", type=float, default=None, help="default 0.01")
    t.add_argument("--momentum", type=float, default=None, help="default 0.9")
    t.add_argument("--weight-decay", type=float, default=None, help="default 1e-4")
    t.add_argument("--lr-milestones", type=float, nargs="*", default=None,
                   help="fractions of the epochs at which lr is multiplied by --lr-gamma (default 0.3 0.6)")
    t.add_argument("--lr-gamma", type=float, default=None)
    t.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a better validation accuracy")
    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=None,
                     help="flip + crop (default: on for 3-channel datasets)")
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    t.add_argument("--dirichlet-alpha", type=float, default=None,
                   help="train on the reference's non-IID Dirichlet subsample (seeded by --seed)")
    t.add_argument("--dirichlet-min-size", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("info", help="summarise a trained run directory")
    i.add_argument("run_dir")
    i.add_argument("--json", action="store_true", help="also print the metadata as JSON")
    i.set_defaults(func=_cmd_info)

    sp = sub.add_parser("split", help="decompose a trained model into per-class modules")
    sp.add_argument("--method", default="grad", choices=["grad", "ga", "concern"])
    sp.add_argument("--model-dir", required=True, help="run directory of `cnnsplit train`")
    sp.add_argument("--out", required=True, help="module-set directory")
    sp.add_argument("--alpha", type=float, default=0.1)
    sp.add_argument("--head-epochs", type=int, default=5)
    sp.add_argument("--modularity-epochs", type=int, default=140)
    sp.add_argument("--lr-head", type=float, default=0.01)
    sp.add_argument("--lr-modularity", type=float, default=0.001)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--init", default="ones", choices=["ones", "random", "zeros"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--select-tolerance", type=float, default=0.01,
                    help="accuracy loss allowed when choosing the epoch with the fewest kernels")
    sp.add_argument("--train-subset", type=int, default=None,
                    help="use only the first N images of the training split (CPU budgets)")
    sp.add_argument("--resume", action="store_true")
    cc = sp.add_argument_group("concern identification (--method concern, ResNets)")
    cc.add_argument("--negative-ratio", type=float, default=1.0,
                    help="negative (other-class) inputs per concerned input for tangling identification (paper 1:1)")
    cc.add_argument("--backtrack", default="bln", choices=["bln", "none"],
                    help="bln: backtrack to the last conv layer (MC-BLN, the paper's choice); none: CI+TI+MC")
    cc.add_argument("--delta", type=float, default=0.5, help="MC-BLN's strong-edge threshold")
    cc.add_argument("--concerned-per-class", type=int, default=None,
                    help="class-c training inputs used per module (default: all)")
    ga = sp.add_argument_group("CNNSplitter (--method ga)")
    ga.add_argument("--population", type=int, default=100)
    ga.add_argument("--generations", type=int, default=200)
    ga.add_argument("--groups", type=int, default=None,
                    help="genes per layer (default: 10 below 256 kernels, else 100)")
    ga.add_argument("--mutation-rate", type=float, default=5.0, help="percent of genes set at random")
    ga.add_argument("--eval-images", type=int, default=0, help="search images used for fitness (0: all)")
    ga.add_argument("--sensitivity-images", type=int, default=0,
                    help="search images used for the layer sensitivity analysis (0: all)")
    ga.add_argument("--early-stop", type=int, default=0, help="stop after N generations without improvement")
    ga.add_argument("--sensitive", default=None,
                    help="comma-separated sensitive mask points (default: the automatic sensitivity rule)")
    ga.add_argument("--algorithm", default="cnnsplitter", choices=["cnnsplitter", "simple_ga"],
                    help="simple_ga: evosax's stock SimpleGA on a thresholded genome (fast; not the paper's GA)")
    ga.add_argument("--sensitive-ratios", default=None, help="initial kept-group ratios of sensitive layers (default .6,.7,.8)")
    ga.add_argument("--other-ratios", default=None, help="initial kept-group ratios of other layers (default .4,.5,.6,.7)")
    sp.set_defaults(func=_cmd_split)

    ev = sub.add_parser("evaluate", help="re-evaluate a saved module set")
    ev.add_argument("mod_dir")
    ev.add_argument("--dataset", default=None, help="default: the module set's dataset")
    ev.add_argument("--data-dir", default=None)
    ev.set_defaults(func=_cmd_evaluate)

    mods_help = ("module-set directory, optionally with the classes it may contribute: MOD_DIR[:0,2,5-7] "
                 "(repeat the flag; where several cover a class, the best-F1 module wins)")
    c = sub.add_parser("compose", help="compose modules of one or more module sets into a classifier")
    c.add_argument("--modules", action="append", required=True, help=mods_help)
    c.add_argument("--dataset", default=None,
                   help="evaluate on this dataset or task spec (default: every class the modules cover)")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--form", default="masked", choices=["masked", "extracted"])
    c.add_argument("--execution", default="auto", choices=["auto", "vmap", "unrolled"])
    c.add_argument("--baseline-epochs", type=int, default=0,
                   help="also train the same architecture from scratch on the task (new-task scenario)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--continuous-learning", action="store_true",
                   help="concern modules: also report the composition after re-running tangling "
                        "identification against the other datasets' classes (Pan & Rajan)")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_cmd_compose)

    pa = sub.add_parser("patch", help="patch a weak model's target class with a module")
    pa.add_argument("--weak", required=True, help="run directory of the weak model (target class last)")
    pa.add_argument("--modules", required=True, help="module-set directory")
    pa.add_argument("--target-class", required=True, type=int, help="module index of the target class")
    pa.add_argument("--data-dir", default=None)
    pa.add_argument("--out", required=True)
    pa.set_defaults(func=_cmd_patch)

    r = sub.add_parser("replace", help="swap one class's module for another model's")
    r.add_argument("--modules", action="append", required=True, help=mods_help)
    r.add_argument("--with", dest="with_", required=True, help="module set providing the new module")
    r.add_argument("--class", dest="class_", required=True, type=int, help="module index in --with")
    r.add_argument("--dataset", default=None)
    r.add_argument("--data-dir", default=None)
    r.add_argument("--form", default="masked", choices=["masked", "extracted"])
    r.add_argument("--execution", default="auto", choices=["auto", "vmap", "unrolled"])
    r.add_argument("--out", required=True)
    r.set_defaults(func=_cmd_replace)

    d = sub.add_parser("demo", help="offline end-to-end demo on digits (train, split, evaluate, compose, patch)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--modularity-epochs", type=int, default=28)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DatasetError

    try:
        return args.func(args)
    except (DatasetError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
