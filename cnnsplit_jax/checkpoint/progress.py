"""Checkpoints of resumable loops (training, GradSplitter, CNNSplitter): the state tree and a
JSON progress record as one atomic unit, and the check that a resume continues the same run.

A record holds the run's ``"config"`` and its ``"identity"``: what else must be equal for a
resume not to mix two runs (the model and its weights, content digests of the data, and what
the caller adds: the dataset, the base run, a training subset). A resume with any of them
different is refused, naming each differing key.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..progress import RunWarning
from .trees import PROGRESS_JSON, CheckpointError, load_tree, read_json, recover, save_tree, write_json

__all__ = ["save_progress", "progress_exists", "read_progress", "load_progress", "differences"]


def save_progress(directory: str | os.PathLike, name: str, tree: Any, progress: dict) -> None:
    """Checkpoint a resumable loop: ``tree`` to ``directory/name`` with ``progress`` (a JSON
    record that must hold the run's ``"config"``, and may hold its ``"identity"``) inside it,
    as one atomic unit; a copy of ``progress`` goes to ``directory/name.json`` for people and
    tools to read."""
    if "config" not in progress:
        raise ValueError("progress must record the run's 'config'")
    directory = Path(directory)
    save_tree(directory / name, tree, extra_json=progress)
    write_json(directory / f"{name}.json", progress)


def progress_exists(directory: str | os.PathLike, name: str) -> bool:
    """True when ``directory`` holds a checkpoint of the loop ``name`` (also one left between
    the renames of a save that was killed: ``trees.recover``)."""
    directory = Path(directory)
    if directory.is_dir():
        recover(directory / name)
    return (directory / f"{name}.json").exists() or (directory / name / PROGRESS_JSON).exists()


def _plain(obj):
    return json.loads(json.dumps(obj))  # tuples become lists, as in the record read back


def _show(v) -> str:
    s = "(not recorded)" if v is _MISSING else json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


_MISSING = object()


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``"key was A, now B"`` for every key (nested dicts: ``outer.inner``) whose values differ
    between two JSON records, in ``now``'s key order."""
    out = []
    for k in list(now) + [k for k in saved if k not in now]:
        a, b = saved.get(k, _MISSING), now.get(k, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} was {_show(a)}, now {_show(b)}")
    return out


def read_progress(directory: str | os.PathLike, name: str, config: dict, identity: dict | None = None) -> dict:
    """The progress record of the loop ``name`` saved by ``save_progress`` (the copy inside the
    atomic checkpoint when there is one), checked to come from a run with ``config`` and
    ``identity``.

    Raises:
      CheckpointError: nothing to resume, corrupt JSON, or a run made with another config or
        identity (resuming it would silently mix two runs); the message names the keys.
    """
    directory = Path(directory)
    if not progress_exists(directory, name):
        raise CheckpointError(f"nothing to resume in {directory}: it holds no {name} checkpoint")
    inner = directory / name / PROGRESS_JSON
    progress = read_json(inner if inner.is_file() else directory / f"{name}.json")
    diffs = differences(progress.get("config") or {}, _plain(config))
    if identity is not None:
        saved = progress.get("identity")
        if saved is None:
            warnings.warn(f"{directory} was checkpointed without a record of its model and data (cnnsplit-jax 0.2 "
                          "or earlier): the resume cannot check that they are the same", RunWarning, stacklevel=3)
        else:
            diffs += differences(saved, _plain(identity))
    if diffs:
        raise CheckpointError(
            f"cannot resume {directory}: it is another run ({'; '.join(diffs[:3])}"
            f"{f'; and {len(diffs) - 3} more' if len(diffs) > 3 else ''}); start it again with --overwrite "
            "(overwrite=True), or choose another output directory", detail="\n".join(diffs))
    return progress


def load_progress(directory: str | os.PathLike, name: str, template: Any, config: dict,
                  identity: dict | None = None) -> tuple[Any, dict]:
    """Restore ``(tree, progress)`` saved by ``save_progress``. ``template`` is the tree's
    structure, or a function of the progress record returning it (trees that grow with the
    run, e.g. a history of masks).

    Raises:
      CheckpointError: nothing to resume, a damaged checkpoint, or a run made with another
        config or identity (``read_progress``).
    """
    directory = Path(directory)
    progress = read_progress(directory, name, config, identity)
    if callable(template):
        template = template(progress)
    return load_tree(directory / name, template), progress
