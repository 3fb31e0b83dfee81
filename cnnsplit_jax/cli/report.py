"""What the CLI shows: progress bars and log lines (from ``Progress`` events), markdown tables
of results, and the PNG plots written next to each JSON report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import distributed as dist
from ..progress import Progress
from ..splitters import METHODS

__all__ = ["ProgressPrinter", "module_table", "class_table", "patch_table", "sources_table", "write_split_plots"]


def log(msg: str) -> None:
    """A progress or status line on stderr, from process 0 only (in a run of several
    processes every process runs the command; errors are printed by each)."""
    if dist.is_primary():
        print(msg, file=sys.stderr)


class ProgressPrinter:
    """A ``Progress`` callback: a tqdm bar per epoch (or over generations / batches; only when
    stderr is a terminal) and one log line per epoch or generation.

    ``label(progress)`` names an epoch's bar; ``line(progress)`` formats an epoch's log line
    (None: no line).
    """

    def __init__(self, label=None, line=None, quiet: bool = False):
        self.bar = None
        self.label = label or (lambda p: f"epoch {p.index + 1}/{p.total}")
        self.line = line
        self.quiet = quiet

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty() or not dist.is_primary(),
                    unit="step")

    def __call__(self, p: Progress) -> None:
        if p.stage in ("step", "batch"):
            if self.bar is None:
                self.bar = self._bar(p.steps if p.stage == "step" else p.total,
                                     self.label(p) if p.stage == "step" else "forward batches")
            self.bar.update(1)
            if p.metrics:
                self.bar.set_postfix(loss=f"{p.metrics['loss']:.4f}", acc=f"{p.metrics['acc']:.3f}")
            return
        if p.stage == "generation" and self.bar is None:
            self.bar = self._bar(p.total, "generations")
        if p.stage == "generation":
            self.bar.update(1)
            self.bar.set_postfix(fit=f"{p.metrics['best_fitness']:.3f}", acc=f"{p.metrics['accuracy']:.3f}")
        else:
            self.close()
        if self.line is not None and not self.quiet:
            text = self.line(p)
            if text:
                log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def metric(v, spec: str = ".3f") -> str:
    """A report value: ``"undefined"`` for ``None`` / NaN (an F1 of a module that never fires
    or of a class without images), else ``format(v, spec)``."""
    return "undefined" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def module_table(res: dict, class_names) -> str:
    """Per-module P/R/F1 and the structure column of a split / evaluate report, then the
    summary line (kernel sets: retention and FLOPs; concern sets: active positions, top-5)."""
    concern = "module_size" in res
    col = "active positions" if concern else "kernel retention"
    vals = res["module_size"]["active_fraction"] if concern else res["kernel_retention"]
    lines = [f"| class | precision | recall | F1 | {col} |", "|---|---|---|---|---|"]
    for c, name in enumerate(class_names):
        lines.append(f"| {name} | {metric(res['module_precision'][c])} | {metric(res['module_recall'][c])} | "
                     f"{metric(res['module_f1'][c])} | {vals[c]:.3f} |")
    lines.append("")
    if concern:
        size = res["module_size"]
        lines.append(
            f"model top-1 {res['base_accuracy']:.4f} / top-5 {res['base_top5']:.4f} | composed top-1 "
            f"{res['composed_accuracy']:.4f} / top-5 {res['composed_top5']:.4f} | decomposition cost "
            f"{100 * res['accuracy_loss']:.2f} / {100 * res['top5_loss']:.2f} pt"
            + (f" (whole test set {100 * res['whole_test_set']['accuracy_loss']:.2f} / "
               f"{100 * res['whole_test_set']['top5_loss']:.2f} pt)" if "whole_test_set" in res else "")
            + f" | Jaccard of weights vs model "
            f"{res['mean_jaccard_vs_model']:.3f} | active positions {size['mean_active_fraction']:.3f} | "
            f"Jaccard of active positions between modules {res['mean_jaccard']:.3f} | module params "
            f"{size['module_params']:,} (model {size['model_params']:,}: no weight removed)")
    else:
        lines.append(
            f"base accuracy {res['base_accuracy']:.4f} | composed accuracy {res['composed_accuracy']:.4f} "
            f"| mean kernel retention {res['mean_kernel_retention']:.3f} | mean Jaccard {res['mean_jaccard']:.3f}"
            + (f" | mean module FLOPs {np.mean(res['module_flops_ratio']):.3f} of the base"
               if "module_flops_ratio" in res else ""))
    return "\n".join(lines)


def class_table(rep: dict) -> str:
    lines = ["| class | precision | recall | F1 |", "|---|---|---|---|"]
    for n, p, r, f in zip(rep["class_names"], rep["precision"], rep["recall"], rep["f1"]):
        lines.append(f"| {n} | {metric(p)} | {metric(r)} | {metric(f)} |")
    return "\n".join(lines)


def sources_table(res: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| source | base model accuracy | its own modules |", "|---|---|---|"]
    lines += [f"| {s['source']} | {fmt(s['base_accuracy'])} | {fmt(s.get('modules_accuracy'))} |"
              for s in res["sources"]]
    return "\n".join(lines)


def patch_table(res: dict) -> str:
    lines = ["| | TC precision | TC recall | TC F1 | non-TC accuracy |", "|---|---|---|---|---|"]
    for key in ("before", "after"):
        r = res[key]
        lines.append(f"| {key} | {metric(r['precision'])} | {metric(r['recall'])} | {metric(r['f1'])} | "
                     f"{r['accuracy']:.4f} |")
    return "\n".join(lines)


def write_split_plots(out: Path, res: dict, class_names) -> None:
    """The PNGs of a split / evaluate report: retention heatmap, F1 bars, accuracy vs kept
    kernels over the search (GradSplitter), fitness over generations (CNNSplitter)."""
    from . import plots

    plots.f1_bars(res["module_f1"], out / "module_f1.png", class_names)
    if "layer_retention" in res:
        plots.retention_heatmap(res["layer_retention"], out / "retention_heatmap.png", class_names)
    history = res.get("history")
    m = METHODS.get(res.get("method"))
    if m is not None and m.history_plot and history:
        HISTORY_PLOTS[m.history_plot](res, out)


#: the plots of a search's history (a method's ``history_plot``): (report, directory) -> PNG
HISTORY_PLOTS = {
    "accuracy_vs_kernels": lambda res, out: _plots().accuracy_vs_kernels(
        res["history"], out / "accuracy_vs_kernels.png", res.get("base_val_accuracy", res["base_accuracy"]),
        res.get("selected_epoch")),
    "fitness_over_generations": lambda res, out: _plots().fitness_over_generations(
        res["history"], out / "fitness.png", res["best_generation"]),
}


def _plots():
    from . import plots

    return plots
