"""The one resumable loop: training, GradSplitter and CNNSplitter checkpoint after every unit of
work (an epoch, a generation) and resume where they stopped, through ``ResumableLoop``.

    loop = ResumableLoop(ckpt_dir, "search", config, identity, seconds_key="search_seconds")
    if resume:
        tree = loop.resume(template)          # history, seconds and the kept fields come back
    for unit in range(loop.done, total):
        ...                                   # one epoch / generation
        loop.seconds = ...                    # wall or work seconds, cumulative over resumes
        loop.record(rec, tree, best_epoch=b)  # history += rec; checkpoint tree + record

What a resume must find equal (the config, the identity: model, weights, data digests, the
caller's keys) is checked by ``progress.read_progress``, which names every difference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .progress import load_progress, save_progress

__all__ = ["ResumableLoop"]

_OWN = ("history", "config", "identity")


class ResumableLoop:
    """One resumable loop's bookkeeping.

    directory: where ``name`` (the tree) and ``name.json`` (the record) go; None: no
    checkpoints (and no resume). config / identity: JSON of what a resume must find equal.
    seconds_key: the record's key of ``seconds``. After ``resume``: ``history`` (one record
    per finished unit), ``seconds`` and ``fields`` (the other keys the loop keeps, e.g. the
    best epoch) are those of the checkpoint; ``done`` is the number of finished units.
    """

    def __init__(self, directory: str | os.PathLike | None, name: str, config: dict, identity: dict | None = None,
                 *, seconds_key: str = "seconds"):
        self.directory = Path(directory) if directory else None
        self.name, self.config, self.identity, self.seconds_key = name, config, identity, seconds_key
        self.history: list[dict] = []
        self.seconds = 0.0
        self.fields: dict = {}

    @property
    def done(self) -> int:
        """Units of work finished (the next one's index)."""
        return len(self.history)

    def resume(self, template: Any) -> Any:
        """The checkpointed tree (``template``: its structure, or a function of the record
        returning it); ``history``, ``seconds`` and ``fields`` are restored. Raises ValueError
        without a directory, ``CheckpointError`` for another run or a damaged checkpoint."""
        if self.directory is None:
            raise ValueError("resume=True needs a checkpoint directory")
        tree, record = load_progress(self.directory, self.name, template, self.config, self.identity)
        self.history, self.seconds = list(record["history"]), float(record[self.seconds_key])
        self.fields = {k: v for k, v in record.items() if k not in _OWN and k != self.seconds_key}
        return tree

    def record(self, rec: dict, tree: Any, **fields) -> None:
        """Append ``rec`` to the history, keep ``fields``, and checkpoint ``tree`` with the
        record (tree and record as one atomic unit) when there is a directory."""
        self.history.append(rec)
        self.fields.update(fields)
        if self.directory is not None:
            save_progress(self.directory, self.name, tree, {
                **self.fields, "history": self.history, self.seconds_key: self.seconds, "config": self.config,
                **({"identity": self.identity} if self.identity is not None else {})})
