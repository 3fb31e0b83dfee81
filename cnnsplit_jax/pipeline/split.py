"""Splitting a trained run into a module set on disk, and re-evaluating a saved one."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax

from .. import checkpoint as ckpt
from .. import mesh as meshlib
from ..data import Normalization
from ..evaluate import evaluate_module_set
from ..modules.module_set import load_module_set, save_module_set
from ..splitters import Method, SplitData, methods_for
from ..splitters.registry import trained_for
from ..splitters import method as method_record
from ..validate import at_least
from .runs import RunWarning, exclusive, prepare_out, run_data

__all__ = ["split_run", "evaluate_run"]


def _check_applies(m: Method, model) -> None:
    """ValueError unless ``m`` decomposes ``model``'s kind of masks, naming the methods that do."""
    if model.mask_kind == m.model_kind:
        return
    fits = sorted(x.name for x in methods_for(model.mask_kind))
    what = ("a model adapted with --kind node (position nodes)" if model.mask_kind == "node" else
            "a model with kernel masks") if model.arch.startswith("adapted:") else \
        ("a ResNet (position nodes)" if model.mask_kind == "node" else "a kernel-mask CNN")
    raise ValueError(f"--method {m.name} does not apply to {model.arch}, {what}: split it with "
                     + " or ".join(f"--method {f}" for f in fits))


@exclusive("out")
def split_run(model_dir: str | Path, out: str | Path, method: str, cfg, *, resume: bool = False,
              overwrite: bool = False, train_subset: int | None = None, data_dir=None, callbacks=None,
              mesh=None, trust_definition: bool | str = False) -> dict:
    """Decompose the model of run ``model_dir`` with ``method`` (``grad``, ``ga``, ``concern``)
    and config ``cfg`` into the module-set directory ``out``: the search (checkpointed in
    ``out``; ``resume`` continues it), the module set, its evaluation (``split.json``).

    ``train_subset``: only the first N images of the base model's training split (CPU
    budgets). The search key is ``jax.random.key(cfg.seed)``. ``mesh``: devices the search's
    modules are split over (``grad``, ``ga``: axes ``modules``, ``data``), or the images of
    concern identification (``data`` only). ``trust_definition``: a model adapted from the
    user's code is rebuilt by importing that code, which needs this opt-in
    (``checkpoint.load_model``). A resume must continue the same run: the same base run,
    dataset, subset, config, model weights and data, or it is refused naming the difference.
    Returns the ``split.json`` dict.
    """
    m = method_record(method)
    at_least("train_subset (images of the training split; leave it out for all)", train_subset, 1, optional=True)
    mesh = meshlib.resolve(mesh, natural=m.natural_axis, allowed=m.mesh_axes)  # a bad spec fails before any work
    model_dir, out = Path(model_dir), Path(out)
    model, meta = ckpt.load_model(model_dir, trust_definition=trust_definition)
    _check_applies(m, model)
    trained = trained_for(meta)
    if trained is not None and trained is not m:
        raise ValueError(f"{model_dir} was trained for {trained.title} (its model runs with what that training "
                         f"added, which --method {m.name} would leave out): split it with --method {trained.name}")
    rd = run_data(meta, data_dir)
    ds = rd.ds
    if ds.info.num_classes != model.num_classes:
        raise ValueError(f"class count mismatch: model has {model.num_classes} classes, dataset has "
                         f"{ds.info.num_classes}")
    name = m.progress
    if name is None and resume:
        raise ValueError(f"--method {method} is a single pass: there is nothing to resume")
    in_progress = (ckpt.progress_exists(out, name) if name else False) or (out / "split.json").exists()
    prepare_out(out, "module_set", resume=resume, overwrite=overwrite, in_progress=in_progress,
                resumable=name is not None)
    norm = Normalization.of(meta.get("normalization") or ds.info)
    tr = rd.train_idx[:train_subset] if train_subset else rd.train_idx
    data = SplitData(ds.x_train[tr], ds.y_train[tr], ds.x_train[rd.val_idx], ds.y_train[rd.val_idx], *norm,
                     x_all=ds.x_train, y_all=ds.y_train)
    for w in m.run_warnings(cfg, len(tr)):
        warnings.warn(w, RunWarning, stacklevel=2)
    extra = {"mesh": mesh} if mesh is not None else {}
    if m.training is not None:
        extra.update(m.training.load(model_dir, model, meta))
    if name is not None:  # what a resume must find as it was, named for people
        extra["identity"] = {"base run": str(model_dir.absolute()), "dataset": meta["dataset"],
                             "train subset": train_subset}
    res = m.package.split(jax.random.key(cfg.seed), model, data, cfg, ckpt_dir=out if name else None,
                          resume=resume, callbacks=callbacks, **extra)
    ms = res.module_set
    ms.meta.update({
        "dataset": meta["dataset"], "normalization": norm.to_json(), "class_names": list(ds.info.class_names),
        "sources": meta.get("sources") or [[ds.info.name, c] for c in range(ds.info.num_classes)],
        "split": meta.get("split", {"seed": meta.get("seed", 0), "val_fraction": 0.2}),
        "base_run": str(model_dir), **({"input_shape": meta["input_shape"]} if meta.get("input_shape") else {})})
    save_module_set(out, ms)
    ev = evaluate_module_set(ms, rd.eval_split, rd.test_split, ds.info)
    result = {"method": method, "model": model.arch, "dataset": meta["dataset"], **ev,
              **m.package.report(res, data), "config": ms.meta["config"]}
    ckpt.write_json(out / "split.json", result)
    return result


@exclusive("mod_dir")
def evaluate_run(mod_dir: str | Path, dataset: str | None = None, data_dir=None, *, mesh=None,
                 trust_definition: bool | str = False) -> dict:
    """Re-evaluate the module set in ``mod_dir`` (on its own dataset, or ``dataset`` with the
    same classes; ``mesh``: devices the batches are split over, axis ``data``;
    ``trust_definition``: see ``split_run``); writes and returns ``evaluate.json``."""
    mesh = meshlib.resolve_data(mesh)  # a bad spec fails before any work
    mod_dir = Path(mod_dir)
    ms = load_module_set(mod_dir, trust_definition=trust_definition)
    rd = run_data({**ms.meta, "dataset": dataset or ms.meta["dataset"]}, data_dir)
    if rd.ds.info.num_classes != ms.num_modules:
        raise ValueError(f"class count mismatch: {ms.num_modules} modules, dataset {rd.ds.info.name!r} has "
                         f"{rd.ds.info.num_classes} classes")
    res = {"method": ms.meta.get("method"), "dataset": rd.ds.info.name,
           **evaluate_module_set(ms, rd.eval_split, rd.test_split, rd.ds.info, mesh=mesh)}
    ckpt.write_json(mod_dir / "evaluate.json", res)
    return res
