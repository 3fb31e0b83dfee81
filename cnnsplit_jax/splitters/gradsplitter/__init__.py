"""GradSplitter (Qi et al., TOSEM 2023): per-module kernel masks learned by gradient descent.

For each class i a module keeps the kernels where its real-valued mask ``m_i > 0`` (strict
step; the backward pass is the incoming gradient clipped to [-1, 1]) and adds a head
``Linear(N, 10) -> ReLU -> Linear(10, 1) -> sigmoid`` on ``relu(logits_i)``. Files:

* ``config``: hyper-parameters, presets, the epoch schedule;
* ``loss``: the straight-through step and the loss;
* ``step``: state, ``init``, the jitted ``modularity_step`` / ``head_step`` (all N modules in one
  step: vmapped groups on the CPU, one vmap on accelerators), feature passes;
* ``search``: ``split`` (the whole schedule, checkpointed) and ``select_epoch``.

API (optax style)::

    state = init(key, model, cfg)                        # GradSplitterState pytree
    state, m = modularity_step(model, cfg, state, x, y)  # masks + heads
    feats = module_features(model, state.masks, x)       # [B, N, K] frozen-mask features
    state, m = head_step(cfg, state, feats, y)           # heads only
    result = split(key, model, data, cfg, ckpt_dir=...)  # the whole schedule -> SplitResult
    state = place(state, mesh)                           # modules split over a device mesh
    state, m = modularity_step(model, cfg, state, x, y, mesh=mesh, n_real=N)
"""

from ...modules.heads import Heads, head_scores, init_heads
from ..base import SearchDivergedError
from .config import (HEAD, MOD, PRESETS, GradSplitterConfig, phase_lr, phase_schedule,
                     round_modularity_epochs, run_warnings, schedule_warnings, configure)
from .loss import binarize, head_loss
from .search import report, select_epoch, split, summary_line
from .step import (GradSplitterState, feature_head_scores, features_for_dataset, head_step, init,
                   module_features, modularity_step, place, reset_optimizer, unplace)

__all__ = [
    "HEAD", "MOD", "PRESETS", "GradSplitterConfig", "GradSplitterState", "Heads", "SearchDivergedError",
    "binarize", "feature_head_scores", "features_for_dataset", "head_loss", "head_scores", "head_step",
    "init", "init_heads", "module_features", "modularity_step",
    "phase_lr", "phase_schedule", "place", "reset_optimizer", "unplace", "round_modularity_epochs", "schedule_warnings",
    "report", "select_epoch", "split", "summary_line", "configure", "run_warnings",
]
