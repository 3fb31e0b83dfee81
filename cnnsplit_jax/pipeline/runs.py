"""Run directories: what kind of artefact a directory holds (and the guard against mixing
two), one writer per directory (``exclusive``), the data of a trained run (its splits), and
training a base model into a directory."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from .. import checkpoint as ckpt
from .. import distributed as dist
from .. import mesh as meshlib
from ..data import Dataset, Normalization, fit_images, is_task_spec, load_dataset, load_task, split_indices, test_splits
from ..models import build_model
from ..progress import RunWarning
from ..splitters import METHODS
from ..splitters import method as method_record
from ..splitters.registry import trained_for, trainers
from ..train import (TrainConfig, accuracy, check_compatible, dirichlet_settings, fit, objective_accuracy,
                     recipe_warnings, summary)

__all__ = ["RunWarning", "RunBusyError", "ARTIFACTS", "artifact_kind", "prepare_out", "exclusive", "run_lock",
           "RunData", "train_data", "run_data", "fit_dataset", "train_run", "LOCK"]


#: a resumable search's checkpoint files: its progress JSON marks a module set in the making
_SEARCH_MARKERS = tuple(f"{m.progress}.json" for m in METHODS.values() if m.resumable)
_SEARCH_ENTRIES = tuple(e for m in METHODS.values() if m.resumable for e in (f"{m.progress}.json", m.progress))

#: artefact kinds, in the order they are recognised: (files that identify one, every top-level
#: entry it writes). A user's adapted model and a trained one are kinds apart: neither
#: replaces the other without ``overwrite``.
ARTIFACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "adapted_model": (("adapt.json",), ("model.json", "model", "adapt.json")),
    "subtask": (("subtask.json", "fine_tune"), ("subtask.json", "fine_tune", "model.json", "model", "head")),
    "model": (("model.json", "train_state.json"),
              ("model.json", "model", "train.json", "train_state.json", "train_state", "adapt.json",
               *(e for m in trainers() for e in m.training.entries))),
    "module_set": (("modules.json", *_SEARCH_MARKERS, "split.json"),
                   ("modules.json", "modules", "base", "split.json", "evaluate.json", *_SEARCH_ENTRIES,
                    "retention_heatmap.png", "module_f1.png", "accuracy_vs_kernels.png", "fitness.png")),
    "composition": (("compose.json",), ("compose.json", "confusion.png")),
    "patch": (("patch.json",), ("patch.json", "confusion_before.png", "confusion_after.png")),
    "replace": (("replace.json",), ("replace.json", "confusion_before.png", "confusion_after.png")),
    "demo": (("demo.json",), ("demo.json", "base", "modules", "compose", "weak", "patch")),
}


def artifact_kind(directory: str | Path) -> str | None:
    """The kind of artefact ``directory`` holds (``ARTIFACTS``), ``"other"`` for a non-empty
    directory of something else, None when it is missing or empty."""
    d = Path(directory)
    if not d.is_dir() or not any(p.name != LOCK for p in d.iterdir()):
        return None
    for kind, (markers, _) in ARTIFACTS.items():
        if any((d / m).exists() for m in markers):
            return kind
    return "other"


def prepare_out(out: str | Path, kind: str, *, resume: bool = False, overwrite: bool = False,
                in_progress: bool = False, resumable: bool = True) -> Path:
    """Make ``out`` ready for an artefact of ``kind``.

    Refuses (ValueError) a non-empty directory that holds another kind of artefact, or
    anything else, unless ``overwrite`` (which removes the other artefact's entries first);
    ``in_progress``: ``out`` holds a run of this kind that only ``resume`` may continue (or
    ``overwrite`` replace; ``resumable=False``: only replace). ``resume`` on a directory of
    another kind is refused even with ``overwrite``.
    """
    out = Path(out)
    have, remove = artifact_kind(out), ()
    if have not in (None, kind):
        if resume:
            raise ValueError(f"cannot resume in {out}: it holds {_a(have)}, not {_a(kind)}")
        if not overwrite:
            what = "files of another program" if have == "other" else _a(have)
            raise ValueError(f"{out} already holds {what}; choose another --out, or pass --overwrite "
                             f"to replace it")
        remove = ARTIFACTS[have][1] if have != "other" else ()
    elif have == kind and in_progress and not resume:
        if not overwrite:
            how = "pass --resume to continue it, --overwrite to start again" if resumable else \
                "pass --overwrite to replace it"
            raise ValueError(f"{out} already holds {_a(kind)}; {how}, or choose another --out")
        remove = ARTIFACTS[kind][1]
    dist.barrier("prepare_out checked")  # every process has looked before process 0 changes anything
    if dist.is_primary():
        _remove(out, remove)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier("prepare_out done")
    return out


#: the lock file of a directory being written (``run_lock``); not part of any artefact
LOCK = ".cnnsplit.lock"
_HELD: set = set()


class RunBusyError(RuntimeError):
    """Another process is writing the same output directory."""


@contextlib.contextmanager
def run_lock(out: str | Path):
    """Hold the exclusive lock of directory ``out`` (created when missing) while writing it, so
    that two runs never write one directory: the second fails at once, naming the first's pid.
    The lock is a ``flock`` on ``out/.cnnsplit.lock`` (released by the kernel if the process
    dies, so a killed run never blocks its ``--resume``); the file is removed on exit, and so
    is a directory this call created and left empty. Re-entrant within a process; process 0
    alone locks in a multi-process run.

    Raises:
      RunBusyError: another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        fcntl = None
    out = Path(out).absolute()
    if fcntl is None or not dist.is_primary() or out in _HELD:
        yield out
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:  # unlinked by its holder meanwhile
            raise OSError("the lock file was replaced")
    except OSError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise RunBusyError(f"{out} is being written by another cnnsplit run ({who}); wait for it to finish, "
                           "or choose another output directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _HELD.add(out)
    try:
        yield out
    finally:
        _HELD.discard(out)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked: a process that opened it meanwhile sees it replaced
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def exclusive(param: str):
    """Decorate a pipeline function so that it runs holding ``run_lock`` of its argument
    ``param`` (the directory it writes)."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with run_lock(sig.bind(*args, **kwargs).arguments[param]):
                return fn(*args, **kwargs)
        return locked
    return wrap


def _a(kind: str) -> str:
    words = kind.replace("_", " ")
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _remove(out: Path, entries) -> None:
    for name in entries:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class RunData(NamedTuple):
    """The data of a trained run: its dataset, the base model's train / validation indices
    into ``ds.x_train``, and the module-evaluation and final-test images (x, y)."""

    ds: Dataset
    train_idx: np.ndarray
    val_idx: np.ndarray
    eval_split: tuple
    test_split: tuple


def train_data(spec: str, data_dir=None) -> tuple[Dataset, list]:
    """(Dataset, [[dataset, class], ...]) for a dataset name or a task spec (``data.parse_task``)."""
    if not is_task_spec(spec):
        ds = load_dataset(spec, data_dir)
        return ds, [[ds.info.name, c] for c in range(ds.info.num_classes)]
    task = load_task(spec, data_dir)
    return task.ds, [list(x) for x in task.sources]


def fit_dataset(ds: Dataset, shape) -> Dataset:
    """``ds`` with its train and test images as a model reading ``shape`` takes them
    (``fit_images``)."""
    return dataclasses.replace(ds, x_train=fit_images(ds.x_train, shape), x_test=fit_images(ds.x_test, shape))


def run_data(meta: dict, data_dir=None) -> RunData:
    """The data of a run from its metadata (``model.json`` / ``modules.json``; the dataset's
    name, split seed and input shape, never a path: ``data_dir`` is the caller's): plain datasets
    use the reference's test split (first 20% module evaluation / last 80% test); task specs
    the per-part split of ``data.make_task``. A run of an adapted model reading smaller
    images (``input_shape``) gets centre crops (``fit_images``)."""
    spec = meta["dataset"]
    sp = meta.get("split", {"seed": meta.get("seed", 0), "val_fraction": 0.2})
    # data_dir comes from the caller only: an artefact never chooses the files that are read
    if not is_task_spec(spec):
        ds = load_dataset(spec, data_dir)
        ev, te = test_splits(len(ds.y_test))
        eval_split, test_split = (ds.x_test[ev], ds.y_test[ev]), (ds.x_test[te], ds.y_test[te])
    else:
        task = load_task(spec, data_dir)
        ds = task.ds
        eval_split, test_split = (task.x_eval, task.y_eval), (ds.x_test, ds.y_test)
    tr, va = split_indices(ds.y_train, sp["seed"], sp.get("val_fraction", 0.2), sp.get("dirichlet_alpha"),
                           sp.get("dirichlet_min_size", 100), sp.get("scheme", "seeded"), sp.get("train_images"))
    if meta.get("input_shape"):
        shape = meta["input_shape"]
        ds = fit_dataset(ds, shape)
        eval_split = (fit_images(eval_split[0], shape), eval_split[1])
        test_split = (fit_images(test_split[0], shape), test_split[1])
    return RunData(ds, tr, va, eval_split, test_split)


@exclusive("out")
def train_run(out: str | Path, arch: str | None, dataset: str | None, cfg: TrainConfig = TrainConfig(), *,
              width: float = 1.0, fc_hidden: int | None = None, recipe: str = "reference", data_dir=None,
              resume: bool = False, overwrite: bool = False, callbacks=None, mesh=None, method: str | None = None,
              method_config=None, init_from: str | Path | None = None,
              trust_definition: bool | str = False) -> dict:
    """Train ``arch`` on ``dataset`` (a name or task spec) with ``cfg`` into the run directory
    ``out`` (``model.json`` + ``model/``, ``train.json``; checkpointed every epoch, ``resume``
    continues). ``recipe`` names where ``cfg`` came from (its warnings are raised as
    ``RunWarning``). ``mesh``: data-parallel devices (``fit``). ``method``: train for a method
    that trains its own model (``Method.training``: ``"mwt"``, MwT's mask generators and
    losses, saved in ``out/generators``) with ``method_config`` (default: its config's
    defaults); the test accuracy is then the model's with what it was trained with, and
    ``train.json`` adds ``test_accuracy_model_alone``.

    ``init_from``: instead of building ``arch`` (then None), train the model saved in that run
    directory from its weights: a user's model made into a run by ``adapt_run`` (rebuilt from
    its definition, which needs ``trust_definition``, as ``checkpoint.load_model``) or a zoo
    run. ``dataset`` None takes the run's; the images are fitted to the model's input shape
    and normalised as the run records. Returns the ``train.json`` dict."""
    out = Path(out)
    meshlib.resolve_data(mesh)  # a bad spec fails before any work
    training = method_record(method).training if method is not None else None
    if method is not None and training is None:
        raise ValueError(f"--method {method} decomposes a trained model; it does not train one (train it without "
                         "--method, then split it)")
    if (arch is None) == (init_from is None):
        raise ValueError("train either a zoo architecture (arch) or the model of a run (init_from), not "
                         f"{'both' if arch is not None else 'neither'}")
    if init_from is not None:
        model, ds, sources, dataset = _start_from(Path(init_from), dataset, data_dir, trust_definition)
        arch, width = model.arch, model.width
    else:
        ds, sources = train_data(dataset, data_dir)
        model = build_model(arch, num_classes=ds.info.num_classes, in_channels=ds.info.channels, width=width,
                            key=jax.random.key(cfg.seed), **({"fc_hidden": fc_hidden} if fc_hidden else {}))
    check_compatible(model, ds.info)
    prepare_out(out, "model", resume=resume, overwrite=overwrite,
                in_progress=ckpt.progress_exists(out, "train_state"))
    for w in recipe_warnings(cfg, recipe):
        warnings.warn(w, RunWarning, stacklevel=2)
    counts = summary(model)
    method_config = (method_config or training.config()) if training is not None else None
    objective = training.objective(method_config) if training is not None else None
    res = fit(model, ds, cfg, run_dir=out, resume=resume, callbacks=callbacks, mesh=mesh,
              identity={"dataset spec": dataset, **({"initial model": str(Path(init_from).absolute())}
                                                     if init_from is not None else {})}, objective=objective)
    t0 = time.perf_counter()
    extra, trained_meta = {}, {}
    if training is not None:
        test_acc = objective_accuracy(objective, res.model, res.extra, ds.x_test, ds.y_test, ds.info)
        extra = {"method": method, "test_accuracy_model_alone": accuracy(res.model, ds.x_test, ds.y_test, ds.info),
                 "model_alone": training.alone}
        trained_meta = {training.key: training.save(out, res.model, res.extra, method_config)}
    else:
        test_acc = accuracy(res.model, ds.x_test, ds.y_test, ds.info)
    norm = ds.info.normalization.to_json()
    alpha, min_size = dirichlet_settings(cfg, ds.info.name)
    result = {
        "model": arch, "dataset": dataset, "width": width, "num_classes": ds.info.num_classes,
        "in_channels": ds.info.channels, "num_kernels": counts["num_kernels"], "num_params": counts["num_params"],
        "test_accuracy": test_acc, **extra, "val_accuracy": res.best_val_accuracy, "best_epoch": res.best_epoch,
        "epochs": cfg.epochs, "train_seconds": res.train_seconds, "eval_seconds": time.perf_counter() - t0,
        "history": res.history,
        "normalization": norm, "class_names": list(ds.info.class_names), "seed": cfg.seed,
        "config": {"model": arch, "dataset": dataset, "width": width, "fc_hidden": fc_hidden, "recipe": recipe,
                   "data_dir": data_dir, **ckpt.config_json(cfg),
                   **({"init_from": str(init_from)} if init_from is not None else {}),
                   **({"method": method, "method_config": ckpt.config_json(method_config)}
                      if training is not None else {})},
        "backend": jax.default_backend(),
    }
    ckpt.save_model(out, res.model, {
        "dataset": dataset, "sources": sources, "normalization": norm, "class_names": result["class_names"],
        "test_accuracy": test_acc, "val_accuracy": res.best_val_accuracy, "seed": cfg.seed,
        "split": {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "dirichlet_alpha": alpha,
                  "dirichlet_min_size": min_size, "scheme": cfg.split_scheme, "train_images": cfg.train_images},
        **trained_meta})
    ckpt.write_json(out / "train.json", result)
    return result


def _start_from(run: Path, dataset: str | None, data_dir, trust_definition) -> tuple:
    """(model, dataset, sources, dataset spec) to train the model saved in ``run`` from: its
    images fitted to the model's input shape, normalised as the run records."""
    meta = ckpt.read_model_meta(run)
    trained = trained_for(meta)
    if trained is not None:
        raise ValueError(f"{run} was trained for {trained.title}: its model runs with what that training added; "
                         "start from a plain model (a standard run, or a user's model made into a run by "
                         "`cnnsplit adapt`)")
    model, meta = ckpt.load_model(run, trust_definition=trust_definition)
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise ValueError(f"{run} records no dataset: name the one to train on")
    ds, sources = train_data(dataset, data_dir)  # train_run checks its classes and channels against the model
    if meta.get("input_shape"):
        ds = fit_dataset(ds, meta["input_shape"])
    if meta.get("normalization"):  # the user's model was trained with its own mean and std
        mean, std = Normalization.of(meta["normalization"])
        ds = dataclasses.replace(ds, info=dataclasses.replace(ds.info, mean=tuple(mean), std=tuple(std)))
    return model, ds, sources, dataset
