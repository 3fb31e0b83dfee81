"""Pytrees on disk: ``save_tree`` / ``load_tree`` (Orbax, numbered leaves, a checksum of every
leaf written with it and verified on load), atomic JSON, and content digests.

A tree is written into ``PATH.tmp``; the checksum manifest (``checksums.json``) is its last
file, so a ``.tmp`` holding one is complete. Then ``PATH`` moves to ``PATH.old``, ``PATH.tmp``
to ``PATH``, and ``PATH.old`` is deleted. A process killed between those renames leaves
``PATH.old`` and a complete ``PATH.tmp``: ``recover`` (run by every reader and writer) puts
the newest complete copy back at ``PATH``.

In a run of several processes every process calls the same functions: arrays spread over
processes are gathered first, process 0 alone writes, and all wait at a barrier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import distributed as dist
from ..progress import RunWarning

__all__ = ["CheckpointError", "config_json", "write_json", "read_json", "save_tree", "load_tree", "recover",
           "fingerprint", "MANIFEST"]

#: the checksum manifest inside every tree directory (written last: its presence marks a complete tree)
MANIFEST = "checksums.json"
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


@contextlib.contextmanager
def _quiet():
    """Orbax's and TensorStore's own log lines and warnings (tens of lines of asyncio noise on
    a damaged file) silenced: the caller raises one ``CheckpointError`` instead."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "asyncio", "jax._src.distributed")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


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
    """The JSON object in ``path``. Raises ``CheckpointError`` when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"corrupt JSON in {path}: expected an object, found {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------ digests
def _leaf_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(*arrays) -> str:
    """A short content digest (16 hex digits of SHA-256 over dtypes, shapes and bytes) of
    ``arrays`` (NumPy or JAX arrays, or pytrees of them): what a resume compares to know that
    it continues with the same data and the same model."""
    h = hashlib.sha256()
    for a in jax.tree.leaves(arrays):
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        h.update(_leaf_digest(np.asarray(a)).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ trees
def recover(path: str | os.PathLike) -> None:
    """Put a tree back at ``path`` after a process was killed between ``save_tree``'s two
    renames: the complete ``path.tmp`` (it holds its manifest) when there is one, else the
    previous ``path.old``. Nothing happens when ``path`` exists."""
    path = Path(path).absolute()
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if dist.is_primary() and not path.exists():
        if (tmp / MANIFEST).is_file():
            os.replace(tmp, path)
        elif old.is_dir():
            os.replace(old, path)
        if path.exists() and old.exists():
            shutil.rmtree(old)
    dist.barrier(f"recover {path.name}")


def _to_saveable(leaf):
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return jnp.asarray(leaf)


def save_tree(path: str | os.PathLike, tree: Any, extra_json: dict | None = None) -> None:
    """Save a pytree of arrays (PRNG keys allowed) to an Orbax directory at ``path``, with the
    SHA-256 of every leaf; ``extra_json`` is written as ``path/progress.json`` inside the same
    atomic replacement.

    Several processes: every one calls it; arrays spread over processes are gathered first,
    Orbax's multi-process save writes them from process 0, which alone touches the files."""
    path = Path(path).absolute()
    with_paths = jax.tree_util.tree_leaves_with_path(tree)
    names = [jax.tree_util.keystr(k) for k, _ in with_paths]
    leaves = [_to_saveable(x) for _, x in with_paths]
    if dist.process_count() > 1:
        leaves = dist.host(leaves)  # host arrays: Orbax writes them from its primary host (process 0)
    flat = {f"{i:05d}": x for i, x in enumerate(leaves)}
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    primary = dist.is_primary()
    recover(path)
    if primary:
        for p in (tmp, old):
            if p.exists():
                shutil.rmtree(p)
        path.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier(f"save_tree {path.name}: ready")
    with _quiet():
        _ocp().v1.save(tmp, flat)  # every process: Orbax's own barriers, one writer
    if primary:
        if extra_json is not None:
            _write_json(tmp / PROGRESS_JSON, extra_json)
        sums = [_leaf_digest(np.asarray(x)) for x in leaves]
        _write_json(tmp / MANIFEST, {"format": 1, "count": len(sums), "sha256": sums,  # last: marks it complete
                                     "paths": names})
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier(f"save_tree {path.name}: done")


def _verify(path: Path, flat: dict) -> None:
    """Raise ``CheckpointError`` unless every array of ``flat`` has the checksum written with it."""
    if not (path / MANIFEST).is_file():
        warnings.warn(f"the checkpoint at {path} was written without checksums (by cnnsplit-jax 0.2 or earlier): "
                      "its bytes cannot be verified", RunWarning, stacklevel=3)
        return
    manifest = read_json(path / MANIFEST)
    sums = manifest.get("sha256")
    if not isinstance(sums, list) or len(sums) != len(flat):
        raise CheckpointError(f"corrupt checkpoint at {path}: {MANIFEST} lists {len(sums or [])} arrays, the "
                              f"checkpoint holds {len(flat)}; restore the directory from a backup or delete it and "
                              "run again")
    names = manifest.get("paths") or []
    for i, want in enumerate(sums):
        got = _leaf_digest(np.asarray(flat[f"{i:05d}"]))
        if got != want:
            which = f"array {i}" + (f" ({names[i]})" if i < len(names) else "")
            raise CheckpointError(f"corrupt checkpoint at {path}: {which} does not match the checksum written "
                                  "with it (its files are damaged); restore the directory from a backup or delete "
                                  "it and run again", detail=f"sha256 {got}, recorded {want}")


def load_tree(path: str | os.PathLike, template: Any) -> Any:
    """Restore a pytree saved by ``save_tree`` into the structure and dtypes of ``template``,
    every leaf verified against its checksum. The arrays are uncommitted (on the default
    device, free to move), as freshly built ones are.

    Raises:
      CheckpointError: missing directory, unreadable or damaged data (a checksum that does
        not match), or leaf count / shape that does not match the template.
    """
    path = Path(path).absolute()
    recover(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    leaves, treedef = jax.tree.flatten(template)
    try:
        with _quiet():
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
    _verify(path, flat)
    out = []
    for i, ref in enumerate(leaves):
        got = np.asarray(flat[f"{i:05d}"])
        is_key = isinstance(ref, jax.Array) and jnp.issubdtype(ref.dtype, jax.dtypes.prng_key)
        want_shape = jax.random.key_data(ref).shape if is_key else np.shape(ref)
        if tuple(got.shape) != tuple(want_shape):
            raise CheckpointError(
                f"checkpoint at {path}: array {i} has shape {tuple(got.shape)}, expected "
                f"{tuple(want_shape)} (different model or configuration?)"
            )
        if is_key:
            out.append(jax.random.wrap_key_data(jnp.asarray(got), impl=jax.random.key_impl(ref)))
        else:
            dtype = ref.dtype if hasattr(ref, "dtype") else jnp.asarray(ref).dtype
            out.append(jnp.asarray(got, dtype=dtype))
    return jax.tree.unflatten(treedef, out)
