"""PNG plots for the CLI (matplotlib, Agg backend; imported only by the CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import distributed as dist


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    if dist.is_primary():  # one writer in a run of several processes
        fig.savefig(path, dpi=110)


def retention_heatmap(layer_retention: dict, path: Path, class_names=None) -> None:
    """Per-layer x per-module kernel retention."""
    plt = _plt()
    layers = list(layer_retention)
    mat = np.array([layer_retention[k] for k in layers])
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * mat.shape[1], 1.0 + 0.35 * len(layers)))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(layers)), layers)
    names = class_names or [str(i) for i in range(mat.shape[1])]
    ax.set_xticks(range(mat.shape[1]), names, rotation=60, ha="right")
    ax.set_xlabel("module (class)")
    ax.set_title("kernel retention per layer")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def f1_bars(f1, path: Path, class_names=None) -> None:
    plt = _plt()
    names = class_names or [str(i) for i in range(len(f1))]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(f1), 3.2))
    f1 = [float("nan") if f is None else f for f in f1]  # undefined: no bar
    ax.bar(range(len(f1)), f1, color="tab:blue")
    ax.set_xticks(range(len(f1)), names, rotation=60, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (threshold 0.5)")
    ax.set_title("module F1 on the module-evaluation split")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def accuracy_vs_kernels(history: list[dict], path: Path, base_accuracy: float, selected: int | None = None) -> None:
    plt = _plt()
    ep = [h["epoch"] for h in history]
    acc = [h["val_accuracy"] for h in history]
    ret = [h["mean_retention"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ep, acc, "-o", ms=3, color="tab:blue", label="composed val accuracy")
    ax.axhline(base_accuracy, color="tab:blue", ls=":", label="base model")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(ep, ret, "-s", ms=3, color="tab:red", label="mean kernel retention")
    ax2.set_ylabel("kernel retention", color="tab:red")
    ax2.set_ylim(0, 1.05)
    if selected is not None:
        ax.axvline(selected, color="gray", ls="--", lw=1)
    ax.set_title("accuracy and kept kernels over the search")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def confusion_matrix(cm, path: Path, class_names, title: str = "confusion matrix") -> None:
    """Counts [true, predicted] with row-normalised colours and the counts written in."""
    plt = _plt()
    cm = np.asarray(cm)
    k = cm.shape[0]
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * k, 1.2 + 0.45 * k))
    ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=60, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def fitness_over_generations(history: list[dict], path: Path, best_generation: int | None = None) -> None:
    """CNNSplitter: best fitness, composed accuracy and validation fitness per generation."""
    plt = _plt()
    g = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(g, [h["best_fitness"] for h in history], label="best fitness")
    ax.plot(g, [h["accuracy"] for h in history], label="composed accuracy")
    ax.plot(g, [h["valid_fitness"] for h in history], label="validation fitness", linestyle="--")
    if best_generation is not None:
        ax.axvline(best_generation, color="gray", linewidth=0.8, label="selected")
    ax.set_xlabel("generation")
    ax.legend(fontsize=8)
    ax.set_title("CNNSplitter search")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
