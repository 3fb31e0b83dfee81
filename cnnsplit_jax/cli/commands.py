"""The ``cnnsplit`` subcommands: each turns its flags into configs, calls one ``pipeline``
function, prints a table and writes the plots. Progress goes to stderr; results to stdout."""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from .. import pipeline
from ..models import ARCHITECTURES, mask_points
from ..pipeline import DemoConfig, RunWarning
from ..splitters import METHODS, methods_for
from ..splitters.mwt import SUBTASK_RECIPE
from ..splitters.registry import trainers
from ..train import RECIPES, TrainConfig, summary
from . import plots
from .parser import config_from, given_flags
from .report import (ProgressPrinter, class_table, log, metric, module_table, patch_table, sources_table,
                     write_split_plots)

__all__ = ["COMMANDS"]

TRAIN_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_milestones", "lr_gamma", "augment",
                "augment_val", "split_scheme", "patience", "dirichlet_alpha", "dirichlet_min_size", "train_images", "seed",
                "lr_schedule", "nesterov")
#: the flags of the training configs of methods that train their own model (``Method.training``)
TRAINING_FIELDS = tuple(dict.fromkeys(f for m in trainers() for f in m.training.cli_fields))


def _warn(msg: str) -> None:
    import warnings

    warnings.warn(msg, RunWarning, stacklevel=2)


def _train_line(p) -> str | None:
    if p.stage != "epoch":
        return None
    r = p.metrics
    return (f"epoch {p.index + 1:3d}/{p.total}  loss {r['train_loss']:.4f}  train acc {r['train_accuracy']:.4f}  "
            f"val acc {r['val_accuracy']:.4f}  [{r['seconds']:.1f}s]")


def _check_start(args) -> None:
    """``train``'s starting point: --model with --dataset, or --init-from without --width/--fc-hidden."""
    if args.model is not None and args.dataset is None:
        raise ValueError("--model needs --dataset (the data to train it on)")
    if args.init_from is not None and (args.width is not None or args.fc_hidden is not None):
        raise ValueError("--width/--fc-hidden build a zoo model; --init-from trains the run's model as it is")


def cmd_train(args) -> int:
    _check_start(args)
    trainer = METHODS[args.method].training if args.method in METHODS else None
    node = args.model is not None and ARCHITECTURES[args.model].mask_kind == "node"
    recipe = args.recipe or (trainer.recipe if trainer is not None else "resnet" if node else "reference")
    cfg = config_from(TrainConfig, args, TRAIN_FIELDS, RECIPES[recipe])
    if isinstance(cfg.lr_milestones, list):
        cfg = TrainConfig(**{**ckpt.config_json(cfg), "lr_milestones": tuple(cfg.lr_milestones)})
    given = given_flags(args, TRAINING_FIELDS)
    own = set(trainer.cli_fields) if trainer is not None else set()
    if set(given) - own:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(set(given) - own))} set the loss of "
                         f"a method that trains its own model: add its --method ("
                         f"{', '.join(m.name for m in trainers())})")
    method_cfg = trainer.config(**given) if trainer is not None else None
    what = f"{args.model} (width {args.width or 1.0})" if args.model else f"the model of {args.init_from}"
    log(f"training {what} on {args.dataset or 'its dataset'} for {cfg.epochs} epochs ({recipe} recipe"
        + (f", {METHODS[args.method].title} {method_cfg}" if trainer is not None else "") + ")")
    res = pipeline.train_run(args.out, args.model, args.dataset, cfg, width=args.width or 1.0,
                             fc_hidden=args.fc_hidden, recipe=recipe, data_dir=args.data_dir, resume=args.resume,
                             overwrite=args.overwrite, callbacks=ProgressPrinter(line=_train_line), mesh=args.mesh,
                             method=args.method if trainer is not None else None, method_config=method_cfg,
                             init_from=args.init_from, trust_definition=args.trust_definition)
    log(f"{res['num_kernels']} kernels, {res['num_params']:,} params; test accuracy {res['test_accuracy']:.4f}"
        + (f", {res['test_accuracy_model_alone']:.4f} {res['model_alone']}" if trainer is not None else "")
        + f"; wrote {Path(args.out) / 'train.json'}")
    return 0


def _info_untrusted(run: Path, meta: dict, as_json: bool) -> int:
    """What ``info`` shows of an adapted model without importing its definition."""
    spec = meta["adapted"]
    rows = [("model", meta.get("arch", "?")), ("definition", f"{spec.get('definition')} (not imported; "
            "--trust-definition loads the model)"), ("input shape", spec.get("input_shape")),
            ("classes", spec.get("num_classes")), ("dataset", meta.get("dataset", "?")),
            ("test accuracy", meta.get("test_accuracy", "?")),
            ("mask points", ", ".join(f"{n}" + ("=" + "+".join(ls) if len(ls) > 1 else "")
                                      for n, ls in spec.get("points", [])))]
    for k, v in rows:
        print(f"{k:>16}: {v}")
    if as_json:
        print(json.dumps(meta, indent=2))
    return 0


def cmd_info(args) -> int:
    run = Path(args.run_dir)
    meta = ckpt.read_model_meta(run)
    if "adapted" in meta and not args.trust_definition:
        return _info_untrusted(run, meta, args.json)
    model, meta = ckpt.load_model(run, trust_definition=args.trust_definition)
    counts = summary(model)
    train = ckpt.read_json(run / "train.json") if (run / "train.json").is_file() else {}
    rows = [("model", model.arch), ("width", model.width), ("classes", model.num_classes),
            ("input channels", model.in_channels), ("kernels", counts["num_kernels"]),
            ("parameters", f"{counts['num_params']:,}"), ("dataset", meta.get("dataset", "?")),
            ("test accuracy", meta.get("test_accuracy", "?")),
            ("train seconds", round(train["train_seconds"], 1) if "train_seconds" in train else "?")]
    for k, v in rows:
        print(f"{k:>16}: {v}")
    if model.mask_kind == "node":  # the position nodes concern identification masks
        nodes = model.nodes()
        print(f"{'nodes':>16}: {len(nodes)} ({sum(n.size for n in nodes):,} positions): "
              + ", ".join(f"{n.name}{list(n.shape)}" for n in nodes))
    else:
        print(f"{'mask points':>16}: " + ", ".join(
            f"{p.name}[{p.size}]" + ("x" + str(len(p.layers)) if len(p.layers) > 1 else "") for p in mask_points(model)))
    if args.json:
        print(json.dumps({**meta, **counts}, indent=2))
    return 0


def cmd_adapt(args) -> int:
    log(f"adapting {args.definition} for {args.dataset}")
    res = pipeline.adapt_run(args.out, args.definition, args.dataset, variables=args.variables,
                             input_shape=args.input_shape, ties=args.ties, apply_kwargs=args.apply_kwargs,
                             train_kwargs=args.train_kwargs, kind=args.kind, mean=args.mean, std=args.std,
                             data_dir=args.data_dir, seed=args.seed, overwrite=args.overwrite)
    print(f"{'model':>16}: {res['model']} reading {res['input_shape']}")
    print(f"{'test accuracy':>16}: {res['test_accuracy']:.4f}")
    print(f"{'mask points':>16}: " + ", ".join(
        f"{n}[{c}]" + ("=" + "+".join(ls) if len(ls) > 1 else "") for n, c, ls in res["mask_points"]))
    method = methods_for(args.kind)[0].name
    log(f"wrote {Path(args.out) / 'adapt.json'}; next: cnnsplit split --method {method} --model-dir {args.out} "
        "--out MODULES --trust-definition")
    return 0


def _split_config(args):
    """The config of ``cnnsplit split``: the method's preset (``--recipe``; CNNSplitter's
    ``auto`` reads the model's architecture and dataset from ``--model-dir``) and the flags
    given; the method's warnings are issued and its notes logged."""
    m = METHODS[args.method]
    path = Path(args.model_dir) / "model.json"
    meta = ckpt.read_json(path) if path.is_file() else {}
    cfg, warns, notes = m.make_config(given_flags(args, m.cli_fields), args.recipe,
                                      arch=meta.get("arch", ""), dataset=str(meta.get("dataset", "")))
    for note in notes:
        log(note)
    for w in warns:
        _warn(w)
    return cfg


def _split_line(p) -> str | None:
    r = p.metrics
    if p.stage == "epoch":
        return (f"epoch {p.index + 1:3d}/{p.total} {r['phase']:>10}  loss {r['loss']:.4f}  val acc "
                f"{r['val_accuracy']:.4f}  kept kernels {r['mean_kernels']:.0f} ({r['mean_retention']:.3f})  "
                f"[{r['seconds']:.1f}s]")
    if p.stage == "generation":
        return (f"generation {r['generation']:3d}  best fitness {r['best_fitness']:.4f}  accuracy "
                f"{r['accuracy']:.4f}  diff {r['diff']:.3f}  kept kernels {r['mean_kept_kernels']:.0f}  "
                f"[{r['seconds']:.1f}s]")
    return None


def _split_label(p) -> str:
    return f"epoch {p.index + 1}/{p.total}"


def cmd_split(args) -> int:
    cfg = _split_config(args)
    log(f"{args.method} split of {args.model_dir} into {args.out}")
    res = pipeline.split_run(args.model_dir, args.out, args.method, cfg, resume=args.resume,
                             overwrite=args.overwrite, train_subset=args.train_subset,
                             callbacks=ProgressPrinter(label=_split_label, line=_split_line), mesh=args.mesh,
                             trust_definition=args.trust_definition)
    out = Path(args.out)
    names = ckpt.read_json(out / "modules.json")["class_names"]
    write_split_plots(out, res, names)
    print(module_table(res, names))
    print("\n" + METHODS[args.method].package.summary_line(res))
    log(f"wrote {out / 'split.json'} and plots")
    return 0


def cmd_evaluate(args) -> int:
    mod = Path(args.mod_dir)
    res = pipeline.evaluate_run(mod, args.dataset, args.data_dir, mesh=args.mesh,
                                trust_definition=args.trust_definition)
    names = ckpt.read_json(mod / "modules.json").get("class_names") or [str(i) for i in range(len(res["module_f1"]))]
    write_split_plots(mod, res, names)
    print(module_table(res, names))
    log(f"wrote {mod / 'evaluate.json'}")
    return 0


def cmd_compose(args) -> int:
    log(f"composing modules of {len(args.modules)} module set(s)"
        + (f"; training a from-scratch baseline for up to {args.baseline_epochs} epochs" if args.baseline_epochs else ""))
    res = pipeline.compose_run(args.modules, args.out, dataset=args.dataset, data_dir=args.data_dir, form=args.form,
                               execution=args.execution, baseline_epochs=args.baseline_epochs, seed=args.seed,
                               continuous=args.continuous_learning, overwrite=args.overwrite, mesh=args.mesh,
                               trust_definition=args.trust_definition)
    out = Path(args.out)
    plots.confusion_matrix(res["confusion"], out / "confusion.png", res["class_names"],
                           f"composed model ({res['accuracy']:.3f})")
    print(class_table(res))
    print("\n" + sources_table(res))
    print(f"\ncomposed accuracy {res['accuracy']:.4f} on {res['images']} test images of {res['task']} "
          f"(modules chosen by F1 on {res['eval_images']} images)")
    if "continuous_learning" in res:
        print(f"after continuous learning (tangling re-run against the other datasets): "
              f"{res['continuous_learning']['accuracy']:.4f}")
    if "baseline" in res:
        b = res["baseline"]
        print(f"trained from scratch: accuracy {b['accuracy']:.4f} in {b['train_seconds']:.1f}s; "
              f"composing took {res['compose_seconds']:.1f}s")
    log(f"wrote {out / 'compose.json'} and {out / 'confusion.png'}")
    return 0


def _patch_plots(out: Path, res: dict) -> None:
    plots.confusion_matrix(res["confusion_before"], out / "confusion_before.png", res["class_names"], "weak model")
    plots.confusion_matrix(res["confusion_after"], out / "confusion_after.png", res["class_names"], "patched")


def cmd_patch(args) -> int:
    res = pipeline.patch_run(args.weak, args.modules, args.target_class, args.out, data_dir=args.data_dir,
                             overwrite=args.overwrite, mesh=args.mesh, trust_definition=args.trust_definition)
    _patch_plots(Path(args.out), res)
    print(patch_table(res))
    log(f"wrote {Path(args.out) / 'patch.json'} and confusion PNGs")
    return 0


def cmd_replace(args) -> int:
    res = pipeline.replace_run(args.modules, args.with_, args.class_, args.out, dataset=args.dataset,
                               data_dir=args.data_dir, form=args.form, execution=args.execution,
                               overwrite=args.overwrite, mesh=args.mesh, trust_definition=args.trust_definition)
    out = Path(args.out)
    for key in ("before", "after"):
        plots.confusion_matrix(res[key]["confusion"], out / f"confusion_{key}.png", res[key]["class_names"],
                               f"{key} ({res[key]['accuracy']:.3f})")
    col = res["column"]
    print(f"class {res['class']}: {res['old_source']} -> {res['new_source']}")
    print(f"accuracy {res['before']['accuracy']:.4f} -> {res['after']['accuracy']:.4f}; "
          f"F1 of the class {metric(res['before']['f1'][col])} -> {metric(res['after']['f1'][col])}")
    log(f"wrote {out / 'replace.json'}")
    return 0


SUBTASK_FIELDS = ("epochs", "batch_size", "lr", "train_images", "seed")


def cmd_subtask(args) -> int:
    cfg = config_from(TrainConfig, args, SUBTASK_FIELDS, SUBTASK_RECIPE)
    log(f"fine-tuning the module of classes {args.classes} of {args.modules} for {cfg.epochs} epochs")
    res = pipeline.subtask_run(args.modules, args.classes, args.out, cfg, compare=args.compare, data_dir=args.data_dir,
                               resume=args.resume, overwrite=args.overwrite, trust_definition=args.trust_definition,
                               callbacks=ProgressPrinter(line=_train_line))
    names = ", ".join(str(c) if n == str(c) else f"{c} ({n})" for c, n in zip(res["classes"], res["class_names"]))
    print(f"sub-task {names} ({res['test_images']} test images of {res['dataset']})")
    print(f"{'module + new head':>34}: {res['test_accuracy']:.4f} (kernel retention {res['kernel_retention']:.3f}, "
          f"best epoch {res['best_epoch'] + 1})")
    if res["base_restricted_accuracy"] is not None:
        print(f"{'base model, logits restricted':>34}: {res['base_restricted_accuracy']:.4f}")
    for path, acc in res["compare_restricted_accuracy"].items():
        print(f"{path + ', logits restricted':>34}: {acc:.4f}")
    log(f"wrote {Path(args.out) / 'subtask.json'}; the module and its head: splitters.mwt.load_subtask({args.out!r})")
    return 0


def cmd_demo(args) -> int:
    """Train a narrow SimCNN on digits, split it with GradSplitter, evaluate, compose the
    extracted modules, and patch a deliberately weak model with one module."""
    cfg = config_from(DemoConfig, args, ("seed", "modularity_epochs"))
    out = Path(args.out)
    res = pipeline.demo(out, cfg, overwrite=args.overwrite, mesh=args.mesh,
                        callbacks=ProgressPrinter(label=_split_label, line=lambda p: _train_line(p) if "train_loss" in
                                                  p.metrics else _split_line(p)))
    split, comp, pt = res["split"], res["compose"], res["patch"]
    names = split["class_names"] if "class_names" in split else ckpt.read_json(out / "modules" / "modules.json")["class_names"]
    write_split_plots(out / "modules", split, names)
    plots.confusion_matrix(comp["confusion"], out / "compose" / "confusion.png", comp["class_names"],
                           f"composed model ({comp['accuracy']:.3f})")
    _patch_plots(out / "patch", pt)
    print("\n## cnnsplit demo: GradSplitter on a narrow SimCNN, digits\n")
    print(module_table(split, names))
    print("\n" + METHODS["grad"].package.summary_line(split))
    print(f"\n## composition of the 10 extracted modules\n\naccuracy {comp['accuracy']:.4f} on {comp['images']} test "
          f"images (masked modules: {split['composed_accuracy']:.4f})")
    print("\n## patching a weak model's class 3 with module 3\n")
    print(patch_table(pt))
    print(f"\ntotal {res['seconds']:.1f}s; results: {out / 'modules' / 'split.json'}, {out / 'compose' / 'compose.json'}, "
          f"{out / 'patch' / 'patch.json'}; plots: PNGs next to them")
    return 0


COMMANDS = {"train": cmd_train, "adapt": cmd_adapt, "info": cmd_info, "split": cmd_split, "evaluate": cmd_evaluate,
            "compose": cmd_compose, "patch": cmd_patch, "replace": cmd_replace, "subtask": cmd_subtask,
            "reuse": cmd_subtask, "demo": cmd_demo}
