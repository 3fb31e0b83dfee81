"""Library functions for runs on disk, the layer the CLI, the demo, the tests and the
benchmarks share: train a model into a run directory, split it into a module set, evaluate,
compose, patch, replace, fine-tune a sub-task module, and the demo. A user's own trained Flax model becomes a run directory with ``adapt_run``. Each writes its JSON report and returns it; none
parses argv or prints. Plots and tables are the CLI's."""

from .adapt import adapt_run
from .demo import DemoConfig, demo
from .reuse import compose_run, load_sources, parse_modules, patch_run, replace_run, subtask_run, task_for
from .runs import (ARTIFACTS, RunBusyError, RunData, RunWarning, artifact_kind, exclusive, prepare_out, run_data,
                   run_lock, train_data, train_run)
from .split import evaluate_run, split_run

__all__ = [
    "ARTIFACTS", "DemoConfig", "RunBusyError", "exclusive", "run_lock", "adapt_run", "RunData", "RunWarning", "artifact_kind", "compose_run", "demo",
    "evaluate_run", "load_sources", "parse_modules", "patch_run", "prepare_out", "replace_run", "run_data",
    "split_run", "subtask_run", "task_for", "train_data", "train_run",
]
