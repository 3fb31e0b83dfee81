"""Checkpoints of trained models and of resumable training / search state.

* ``trees``: any pytree to an Orbax directory and back (``save_tree`` / ``load_tree``), every
  leaf checksummed and verified, atomic replacement with recovery after a kill; JSON helpers;
  ``fingerprint`` (content digests).
* ``models``: trained models in run directories (``save_model`` / ``load_model``); loading an
  adapted model imports the user's code only with ``trust_definition``.
* ``progress``: the one resumable-loop checkpoint (``save_progress`` / ``load_progress``) and
  the check that a resume continues the same run (config and identity, differing keys named);
* ``loop``: ``ResumableLoop``, the bookkeeping every resumable loop shares (history, seconds,
  checkpoint per unit of work, resume).

``config_json`` is the one way a config dataclass becomes JSON.
"""

from .models import MODEL_DIR, MODEL_JSON, UntrustedDefinitionError, load_model, read_model_meta, save_model
from .loop import ResumableLoop
from .progress import differences, load_progress, progress_exists, read_progress, save_progress
from .trees import CheckpointError, config_json, fingerprint, load_tree, read_json, recover, save_tree, write_json

__all__ = [
    "CheckpointError", "UntrustedDefinitionError", "config_json", "fingerprint", "save_tree", "load_tree", "recover",
    "save_model", "load_model", "read_model_meta", "read_json", "write_json", "save_progress", "load_progress",
    "read_progress", "progress_exists", "differences", "MODEL_JSON", "MODEL_DIR", "ResumableLoop",
]
