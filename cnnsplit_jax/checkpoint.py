"""Orbax checkpoints of trained models and of resumable training / search state.

Layout of a run directory written by ``save_model``::

    RUN_DIR/model.json     metadata: arch, width, num_classes, in_channels, fc_hidden,
                           dataset, normalisation (mean, std), accuracies, ...
    RUN_DIR/model/         Orbax checkpoint of the model state (params + BN statistics)

``save_tree`` / ``load_tree`` store any pytree (training or search state) by flattening it
to numbered leaves, and restore it into the structure of a template, so optax / NamedTuple
states round-trip exactly. Writes go to a temporary directory that replaces the old one
only when complete, so an interrupted save never destroys the last good checkpoint.

In a run of several processes (``cnnsplit_jax.distributed``) every process calls the same
functions: arrays spread over processes are gathered first, only process 0 writes, and all
processes wait at a barrier until the write is complete; every process can then read.

Resumable loops (training, GradSplitter, CNNSplitter) use one pair: ``save_progress`` writes
the state tree and a JSON progress record (epoch counters, history, the run's config) as one
atomic unit; ``load_progress`` restores both and refuses a different config.
``config_json`` is the one way a config dataclass becomes JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import distributed as dist
from .models import MaskedCNN, adapt, build_model
from .models.adapted_io import rebuild, variables_of
from .models.intercept import AdapterError

__all__ = [
    "CheckpointError",
    "config_json",
    "save_tree",
    "load_tree",
    "save_model",
    "load_model",
    "read_json",
    "write_json",
    "save_progress",
    "load_progress",
    "progress_exists",
]

MODEL_JSON = "model.json"
MODEL_DIR = "model"
PROGRESS_JSON = "progress.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what is being restored.

    ``str(e)`` says in a line or two which file is affected and what to do; ``e.detail``
    holds the underlying cause (e.g. TensorStore's full message) when there is one.
    """

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


def config_json(cfg: Any) -> dict:
    """A config dataclass as a JSON-ready dict (tuples become lists, nested dataclasses dicts)."""
    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {k: plain(x) for k, x in dataclasses.asdict(v).items()}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename); process 0 only in a multi-process run."""
    if dist.is_primary():
        _write_json(path, obj)
    dist.barrier(f"write_json {Path(path).name}")


def _write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from None




def _to_saveable(leaf):
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return jnp.asarray(leaf)


def save_tree(path: str | os.PathLike, tree: Any, extra_json: dict | None = None) -> None:
    """Save a pytree of arrays (PRNG keys allowed) to an Orbax directory at ``path``;
    ``extra_json`` is written as ``path/progress.json`` inside the same atomic replacement.

    Several processes: every one calls it; arrays spread over processes are gathered first,
    Orbax's multi-process save writes them from process 0, which alone touches the files."""
    path = Path(path).absolute()
    leaves = [_to_saveable(x) for x in jax.tree.leaves(tree)]
    if dist.process_count() > 1:
        leaves = dist.host(leaves)  # host arrays: Orbax writes them from its primary host (process 0)
    flat = {f"{i:05d}": x for i, x in enumerate(leaves)}
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    primary = dist.is_primary()
    if primary:
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p)
        path.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier(f"save_tree {path.name}: ready")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ocp().v1.save(tmp, flat)  # every process: Orbax's own barriers, one writer
    if primary:
        if extra_json is not None:
            _write_json(tmp / PROGRESS_JSON, extra_json)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier(f"save_tree {path.name}: done")


def load_tree(path: str | os.PathLike, template: Any) -> Any:
    """Restore a pytree saved by ``save_tree`` into the structure and dtypes of ``template``.

    Raises:
      CheckpointError: missing directory, unreadable data, or leaf count / shape / dtype
        that does not match the template.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    leaves, treedef = jax.tree.flatten(template)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ocp = _ocp()
            if dist.process_count() > 1:  # saved shardings name the saving process's devices: restore host arrays
                meta = ocp.v1.pytree_metadata(path).metadata
                flat = ocp.v1.load(path, {k: np.empty(v.shape, v.dtype) for k, v in meta.items()})
            else:
                flat = ocp.v1.load(path)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"corrupt checkpoint at {path} ({type(e).__name__}); its files are damaged or "
            "incomplete: restore the directory from a backup or delete it and run again",
            detail=f"{type(e).__name__}: {e}") from None
    if not isinstance(flat, dict) or len(flat) != len(leaves):
        n = len(flat) if isinstance(flat, dict) else "?"
        raise CheckpointError(
            f"checkpoint at {path} has {n} arrays but the expected structure has {len(leaves)}"
        )
    out = []
    for i, ref in enumerate(leaves):
        got = flat[f"{i:05d}"]
        is_key = isinstance(ref, jax.Array) and jnp.issubdtype(ref.dtype, jax.dtypes.prng_key)
        want_shape = jax.random.key_data(ref).shape if is_key else np.shape(ref)
        if tuple(got.shape) != tuple(want_shape):
            raise CheckpointError(
                f"checkpoint at {path}: array {i} has shape {tuple(got.shape)}, expected "
                f"{tuple(want_shape)} (different model or configuration?)"
            )
        if is_key:
            out.append(jax.random.wrap_key_data(got, impl=jax.random.key_impl(ref)))
        else:
            dtype = ref.dtype if hasattr(ref, "dtype") else jnp.asarray(ref).dtype
            out.append(jnp.asarray(got, dtype=dtype))
    return jax.tree.unflatten(treedef, out)


def save_model(run_dir: str | os.PathLike, model: MaskedCNN, meta: dict | None = None) -> None:
    """Write ``model`` (params + BN stats) and ``meta`` to ``run_dir``. An adapted model
    (``cnnsplit_jax.adapt``) is written as its user's variables and ``spec()`` (the
    definition it is rebuilt from, the mask points as adapted)."""
    run_dir = Path(run_dir)
    if getattr(model, "adapted", False):
        if model.definition is None:
            raise CheckpointError(
                f"{model.arch} cannot be saved without its definition: pass definition='package.module:name' "
                "(a callable with no arguments returning the model) to cnnsplit_jax.adapt")
        save_tree(run_dir / MODEL_DIR, variables_of(model))
        write_json(run_dir / MODEL_JSON, {**model.config(), "adapted": model.spec(), **(meta or {})})
        return
    save_tree(run_dir / MODEL_DIR, nnx.state(model))
    write_json(run_dir / MODEL_JSON, {**model.config(), **(meta or {})})


def load_model(run_dir: str | os.PathLike) -> tuple[MaskedCNN, dict]:
    """Rebuild the model saved in ``run_dir``; returns ``(model, metadata)``.

    Raises:
      CheckpointError: no checkpoint there, or it is corrupt / inconsistent with its metadata.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_JSON).is_file() or not (run_dir / MODEL_DIR).is_dir():
        raise CheckpointError(
            f"no model checkpoint in {run_dir} (expected {MODEL_JSON} and {MODEL_DIR}/ as "
            f"written by `cnnsplit train`)"
        )
    meta = read_json(run_dir / MODEL_JSON)
    if "adapted" in meta:
        return _load_adapted(run_dir, meta), meta
    try:
        kwargs = {k: meta[k] for k in ("num_classes", "in_channels", "width")}
        if meta.get("fc_hidden"):  # SimCNN's FC width
            kwargs["fc_hidden"] = meta["fc_hidden"]
        # abstract model (no random init): every variable is then restored from disk
        model = nnx.eval_shape(lambda: build_model(meta["arch"], **kwargs))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"bad metadata in {run_dir / MODEL_JSON}: {e}") from None
    state = load_tree(run_dir / MODEL_DIR, nnx.state(model))
    nnx.update(model, state)
    return model, meta


def _load_adapted(run_dir: Path, meta: dict):
    spec = meta["adapted"]
    try:
        net, variables = rebuild(spec, lambda template: load_tree(run_dir / MODEL_DIR, template))
        points = spec["points"]
        model = adapt(net, variables, input_shape=spec["input_shape"], num_classes=spec["num_classes"],
                      mask_points=[c for _, layers in points for c in layers], ties=[ls for _, ls in points if len(ls) > 1],
                      apply_kwargs=spec.get("apply_kwargs") or {}, name=spec.get("name"), kind=spec["kind"],
                      definition=spec["definition"])
    except AdapterError as e:
        raise CheckpointError(f"cannot rebuild the adapted model of {run_dir}: {e}") from None
    if [[p.name, list(p.layers)] for p in model.mask_points()] != points:
        raise CheckpointError(f"{run_dir}: the definition {spec['definition']!r} no longer has the saved mask points "
                              f"{[n for n, _ in points]}")
    return model


# ------------------------------------------------------------------------ resumable loops
def save_progress(directory: str | os.PathLike, name: str, tree: Any, progress: dict) -> None:
    """Checkpoint a resumable loop: ``tree`` to ``directory/name`` with ``progress`` (a JSON
    record that must hold the run's ``"config"``) inside it, as one atomic unit; a copy of
    ``progress`` goes to ``directory/name.json`` for people and tools to read."""
    if "config" not in progress:
        raise ValueError("progress must record the run's 'config'")
    directory = Path(directory)
    save_tree(directory / name, tree, extra_json=progress)
    write_json(directory / f"{name}.json", progress)


def progress_exists(directory: str | os.PathLike, name: str) -> bool:
    """True when ``directory`` holds a checkpoint of the loop ``name``."""
    directory = Path(directory)
    return (directory / f"{name}.json").exists() or (directory / name / PROGRESS_JSON).exists()


def read_progress(directory: str | os.PathLike, name: str, config: dict) -> dict:
    """The progress record of the loop ``name`` saved by ``save_progress`` (the copy inside the
    atomic checkpoint when there is one), checked to come from a run with ``config``.

    Raises:
      CheckpointError: nothing to resume, corrupt JSON, or a run made with another config
        (resuming it would silently mix two runs).
    """
    directory = Path(directory)
    inner = directory / name / PROGRESS_JSON
    progress = read_json(inner if inner.is_file() else directory / f"{name}.json")
    if progress.get("config") != config:
        raise CheckpointError(
            f"cannot resume {directory}: it ran with config {progress.get('config')}, now {config}")
    return progress


def load_progress(directory: str | os.PathLike, name: str, template: Any, config: dict) -> tuple[Any, dict]:
    """Restore ``(tree, progress)`` saved by ``save_progress``. ``template`` is the tree's
    structure, or a function of the progress record returning it (trees that grow with the
    run, e.g. a history of masks).

    Raises:
      CheckpointError: nothing to resume, a damaged checkpoint, or a run made with another
        config (resuming it would silently mix two runs).
    """
    directory = Path(directory)
    progress = read_progress(directory, name, config)
    if callable(template):
        template = template(progress)
    return load_tree(directory / name, template), progress
