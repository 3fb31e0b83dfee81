"""Reuse runs on disk: compose module sets into a classifier for a task, patch a weak model,
replace one class's module, fine-tune a sub-task module. Each writes its JSON report into an
output directory and returns it."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import jax

from .. import checkpoint as ckpt
from .. import mesh as meshlib
from ..compose import Pick
from ..data import DatasetInfo, Normalization, is_task_spec, load_task, parse_classes
from ..modules.module_set import load_module_set
from ..reuse import Source, compose_task, continuous_learning, evaluate_picks, patch, replace, select_picks, \
    train_from_scratch
from ..splitters import METHODS
from ..splitters.mwt.reuse import SUBTASK_RECIPE, fine_tune_subtask, restricted_accuracy, save_subtask, subtask_masks
from ..train import RECIPES, TrainConfig
from ..validate import at_least
from ..data import fit_images
from .runs import exclusive, fit_dataset, prepare_out, run_data

__all__ = ["parse_modules", "load_sources", "task_for", "compose_run", "patch_run", "replace_run", "subtask_run",
           "FINE_TUNE_DIR"]

#: where ``subtask_run`` checkpoints its fine-tuning (resumable)
FINE_TUNE_DIR = "fine_tune"


def parse_modules(spec: str) -> tuple[str, list[int] | None]:
    """``MOD_DIR[:CLASSES]`` -> (path, classes or None), e.g. ``runs/m:0,2,5-7``."""
    path, sep, tail = spec.rpartition(":")
    if sep and re.fullmatch(r"[0-9,\- ]+", tail):
        return path, parse_classes(tail)
    return spec, None


def load_sources(specs: Sequence[str], *, trust_definition: bool | str = False) -> list[Source]:
    """Module sets offered to a composition, from ``MOD_DIR[:CLASSES]`` specs
    (``trust_definition``: ``modules.load_module_set``)."""
    out = []
    for spec in specs:
        path, classes = parse_modules(spec)
        out.append(Source(path, load_module_set(path, trust_definition=trust_definition), classes))
    return out


def task_for(sources: Sequence[Source], dataset: str | None = None, data_dir=None):
    """(spec, Task) a composition is evaluated on: ``dataset`` (a name: the classes the module
    sets cover of it; a task spec: as given) or, without it, every class the module sets
    cover, grouped by dataset in order of appearance."""
    covered: dict[str, list[int]] = {}
    for s in sources:
        for c in s.classes:
            d, k = s.origins[c]
            if k not in covered.setdefault(d, []):
                covered[d].append(k)
    if dataset and is_task_spec(dataset):
        spec = dataset
    else:
        if dataset:
            if dataset not in covered:
                raise ValueError(f"no module set covers dataset {dataset!r} (they cover {sorted(covered)})")
            covered = {dataset: covered[dataset]}
        spec = "+".join(f"{d}:{','.join(map(str, sorted(ks)))}" for d, ks in covered.items())
    return spec, load_task(spec, data_dir)


@exclusive("out")
def compose_run(modules: Sequence[str], out: str | Path, *, dataset: str | None = None, data_dir=None,
                form: str = "masked", execution: str = "auto", baseline_epochs: int = 0, seed: int = 0,
                continuous: bool = False, overwrite: bool = False, mesh=None,
                trust_definition: bool | str = False) -> dict:
    """Compose the best-F1 module of every class of the task (``task_for``) from the module
    sets ``modules`` (``MOD_DIR[:CLASSES]``); ``continuous``: also after continuous learning
    (concern modules); ``baseline_epochs``: also train the same architecture from scratch on
    the task. ``mesh``: devices each batch is split over; ``trust_definition``: module sets of
    adapted models (``modules.load_module_set``). Writes and returns ``compose.json``."""
    mesh = meshlib.resolve_data(mesh)  # a bad spec fails before any work
    at_least("baseline_epochs", baseline_epochs, 0)
    out = prepare_out(out, "composition", overwrite=overwrite)
    sources = load_sources(modules, trust_definition=trust_definition)
    spec, task = task_for(sources, dataset, data_dir)
    shapes = {tuple(s.module_set.base.input_shape) for s in sources}
    if len(shapes) == 1:  # adapted models reading smaller images take centre crops (run_data's rule)
        shape = shapes.pop()
        task = task._replace(ds=fit_dataset(task.ds, shape), x_eval=fit_images(task.x_eval, shape))
    res, picks = compose_task(sources, task, form=form, execution=execution, mesh=mesh)
    res = {"task": spec, "form": form, "execution": execution, **res}
    if continuous:
        cl = continuous_learning(picks, task, key=jax.random.key(seed))
        res["continuous_learning"] = evaluate_picks(cl, task, form=form, execution=execution)
    if baseline_epochs:
        base = picks[0].module_set.base
        recipe = RECIPES["resnet"] if base.mask_kind == "node" else {}
        cfg = TrainConfig(**{**recipe, "epochs": baseline_epochs, "batch_size": 64, "lr_milestones": (),
                             "patience": 5, "seed": seed})
        kw = {k: v for k, v in base.config().items() if k not in ("arch", "num_classes", "in_channels", "width")}
        res["baseline"] = train_from_scratch(task, base.arch, base.width, cfg, key=seed, **kw)
        res["training_seconds_saved"] = res["baseline"]["train_seconds"] - res["compose_seconds"]
    ckpt.write_json(out / "compose.json", res)
    return res


@exclusive("out")
def patch_run(weak_dir: str | Path, modules: str, target_class: int, out: str | Path, *, data_dir=None,
              overwrite: bool = False, mesh=None, trust_definition: bool | str = False) -> dict:
    """Patch the weak model of run ``weak_dir`` (trained with the target class last) with
    module ``target_class`` of the module set ``modules`` (CNNSplitter's protocol). ``mesh``:
    devices the module's batches are split over. Writes and returns ``patch.json``."""
    mesh = meshlib.resolve_data(mesh)  # a bad spec fails before any work
    out = prepare_out(out, "patch", overwrite=overwrite)
    weak, meta = ckpt.load_model(Path(weak_dir), trust_definition=trust_definition)
    (src,) = load_sources([modules], trust_definition=trust_definition)
    k = int(target_class)
    if not 0 <= k < src.module_set.num_modules:
        raise ValueError(f"unknown class index {k}; {modules} has classes 0..{src.module_set.num_modules - 1}")
    weak_sources = [tuple(x) for x in meta.get("sources") or []]
    if weak_sources and weak_sources[-1] != src.origins[k]:
        raise ValueError(
            f"the weak model's last (target) class is {weak_sources[-1]} but module {k} of "
            f"{modules} recognises {src.origins[k]}; train the weak model with the target class last")
    if meta.get("class_names") and weak.num_classes != len(meta["class_names"]):
        raise ValueError("weak model metadata and weights disagree on the class count")
    x_test, y_test = run_data(meta, data_dir).test_split
    # the module's score range comes from its target-class images of its base model's
    # validation split (the reference's module_output_collector)
    ms_meta = dict(src.module_set.meta)
    if "split" not in ms_meta:
        raise ValueError(f"{modules} does not record its base model's train/val split; re-run the split")
    rd = run_data(ms_meta, data_dir)
    x_va, y_va = rd.ds.x_train[rd.val_idx], rd.ds.y_train[rd.val_idx]
    norm = meta["normalization"]
    names = tuple(meta.get("class_names") or map(str, range(weak.num_classes)))
    info = DatasetInfo(meta["dataset"], names, weak.in_channels, tuple(norm["mean"]), tuple(norm["std"]))
    res = {"weak": str(weak_dir), "modules": modules,
           **patch(weak, info, x_test, y_test, src.module_set, k, x_va[y_va == k], mesh=mesh)}
    res["class_names"] = list(names)
    ckpt.write_json(out / "patch.json", res)
    return res


@exclusive("out")
def replace_run(modules: Sequence[str], with_: str, class_: int, out: str | Path, *, dataset: str | None = None,
                data_dir=None, form: str = "masked", execution: str = "auto", overwrite: bool = False,
                mesh=None, trust_definition: bool | str = False) -> dict:
    """Compose the module sets ``modules`` for their task, then swap the module of the class
    that module ``class_`` of ``with_`` recognises for it (``mesh``: devices each batch is
    split over). Writes and returns ``replace.json``."""
    mesh = meshlib.resolve_data(mesh)  # a bad spec fails before any work
    out = prepare_out(out, "replace", overwrite=overwrite)
    sources = load_sources(modules, trust_definition=trust_definition)
    (new,) = load_sources([with_], trust_definition=trust_definition)
    k = int(class_)
    if not 0 <= k < new.module_set.num_modules:
        raise ValueError(f"unknown class index {k}; {with_} has classes 0..{new.module_set.num_modules - 1}")
    spec, task = task_for(sources, dataset, data_dir)
    picks, _ = select_picks(sources, task)
    origin = new.origins[k]
    cols = [t for t, o in enumerate(task.sources) if tuple(o) == origin]
    if not cols:
        raise ValueError(f"module {k} of {with_} recognises {origin}, which is not a class of {spec}")
    res = {"task": spec, **replace(picks, cols[0], Pick(new.module_set, k, new.label), task, form=form,
                                   execution=execution, mesh=mesh)}
    ckpt.write_json(out / "replace.json", res)
    return res


@exclusive("out")
def subtask_run(modules: str | Path, classes: Sequence[int] | str, out: str | Path, cfg: TrainConfig | None = None,
                *, compare: Sequence[str | Path] = (), data_dir=None, resume: bool = False, overwrite: bool = False,
                trust_definition: bool | str = False, callbacks=None) -> dict:
    """MwT's sub-task reuse for any module set: the module of ``classes`` (``"0,3"`` or a
    list; the union of their masks, physically extracted) with a new head, fine-tuned on the
    training images of those classes of the modules' dataset (``cfg``: default
    ``SUBTASK_RECIPE``; the best validation epoch), measured on their test images.

    Beside it, the same images classified by trained models with their logits restricted to
    ``classes``: the modules' own base model (not for a method that trains with its own
    parameters, e.g. MwT, whose base model alone is not the model it trained) and every run
    in ``compare`` (e.g. the standard model of the same architecture). The fine-tuning
    checkpoints every epoch in ``out/fine_tune`` (``resume`` continues it); the module and head
    are saved in ``out`` (``splitters.mwt.load_subtask``; ``cnnsplit info`` reads it). Writes
    and returns ``subtask.json``."""
    cfg = cfg or TrainConfig(**SUBTASK_RECIPE)
    ms = load_module_set(modules, trust_definition=trust_definition)
    classes = parse_classes(classes) if isinstance(classes, str) else [int(c) for c in classes]
    subtask_masks(ms, classes)  # bad classes fail before any work
    others = [(str(c), *ckpt.load_model(c, trust_definition=trust_definition)) for c in compare]
    for path, model, meta in others:
        if meta.get("dataset") != ms.meta.get("dataset") or model.num_classes != ms.num_modules:
            raise ValueError(f"--compare {path}: a model of {meta.get('dataset')!r} with {model.num_classes} classes, "
                             f"the modules are of {ms.meta.get('dataset')!r} with {ms.num_modules}")
    out = Path(out)
    prepare_out(out, "subtask", resume=resume, overwrite=overwrite,
                in_progress=ckpt.progress_exists(out / FINE_TUNE_DIR, "train_state"))
    rd = run_data(ms.meta, data_dir)
    t0 = time.perf_counter()
    r = fine_tune_subtask(ms, rd.ds, classes, cfg, run_dir=out / FINE_TUNE_DIR, resume=resume, callbacks=callbacks)
    method = METHODS.get(ms.meta.get("method"))
    restricted = {path: restricted_accuracy(model, rd.ds, classes, Normalization.of(meta.get("normalization") or rd.ds.info))
                  for path, model, meta in others}
    res = {"modules": str(modules), "method": ms.meta.get("method"), "dataset": rd.ds.info.name, "classes": classes,
           "class_names": [rd.ds.info.class_names[c] for c in classes], "test_accuracy": r.test_accuracy,
           "test_images": int(sum((rd.ds.y_test == c).sum() for c in classes)),
           "kernel_retention": r.kernel_retention, "best_epoch": r.fit.best_epoch,
           "fine_tune_seconds": time.perf_counter() - t0, "config": ckpt.config_json(cfg),
           "base_restricted_accuracy": (restricted_accuracy(ms.base, rd.ds, classes, ms.normalization)
                                        if method is not None and method.training is None else None),
           "compare_restricted_accuracy": restricted, "history": r.fit.history}
    save_subtask(out, r, {"dataset": ms.meta.get("dataset"), "normalization": rd.ds.info.normalization.to_json(),
                          "class_names": res["class_names"], "modules": str(modules), "test_accuracy": r.test_accuracy})
    ckpt.write_json(out / "subtask.json", res)
    return res
