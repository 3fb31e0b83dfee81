"""The markdown report and the search-curve plot of ``reproduce.py``'s ``report.json``."""

from __future__ import annotations

from pathlib import Path


def _f(v, fmt=".4f", scale=1.0) -> str:
    return "n/a" if v is None else format(v * scale, fmt)


def _gb(b) -> str:
    return "n/a (no device statistics)" if b is None else f"{b / 2**30:.2f}"


def _model_rows(stage: dict) -> list[str]:
    rows = []
    for name, r in stage.get("models", {}).items():
        if stage["stage"] == "train" and not r.get("finished", True):
            rows.append(f"| {name} | {r['epochs_done']} / {r['plan']['epochs']} epochs (cut off: run the command "
                        "again to resume) | | | | |")
            continue
        if stage["stage"] == "train":
            rows.append(f"| {name} | {r['epochs']} epochs (best {r['best_epoch']}) | test {_f(r['test_accuracy'])}, "
                        f"val {_f(r['val_accuracy'])} | | | {_f(r['train_seconds'], '.0f')} s |")
            continue
        if stage["stage"] == "gradsplitter":
            units = f"{r['epochs_done']} / {r['schedule_epochs']} epochs"
            proj = f"projected full schedule {_f(r.get('projected_schedule_s'), '.0f')} s"
        elif stage["stage"] == "cnnsplitter":
            units = f"{r['generations_done']} / {r['generations_planned']} generations"
            proj = f"median generation {_f(r.get('median_generation_s'), '.2f')} s"
        else:
            units, proj = stage.get("variants", {}).get(name, name), ""
        if not r.get("finished"):
            rows.append(f"| {name} | {units} (cut off: run the command again to resume) | | | | {proj} |")
            continue
        rows.append(f"| {name} | {units} | base {_f(r['base_accuracy'])}, composed {_f(r['composed_accuracy'])} | "
                    f"{_f(r['mean_kernel_retention'], '.3f')} | {_f(r['mean_module_f1'], '.3f')} | {proj} |")
    return rows


def _reference_rows(ref: dict) -> list[str]:
    out = []
    for r in ref.get("gradsplitter", []):
        out.append(f"| GradSplitter {r['model']} modularity step (batch {r['batch']}) | {r['mod_step_s'] * 1e3:.1f} ms | "
                   f"{r['reference_mod_step_s'] * 1e3:.1f} ms | **{r['mod_ratio_vs_reference']:.3f}** | "
                   f"{r['reference_device']} |")
        out.append(f"| GradSplitter {r['model']} head step (effective) | {r['head_step_effective_s'] * 1e3:.1f} ms | "
                   f"{r['reference_head_step_s'] * 1e3:.1f} ms | **{r['head_ratio_vs_reference']:.3f}** | "
                   f"{r['reference_device']} |")
    g = ref.get("cnnsplitter")
    if g:
        out.append(f"| CNNSplitter generation ({g['population']} x {g['classes']} individuals, {g['images']} images) "
                   f"| {g['generation_s']:.2f} s | {g['reference_generation_s']:.2f} s (from {g['sample']} "
                   f"individuals) | **{g['ratio']:.3f}** | {g['reference_device']} |")
    return out


def markdown(report: dict) -> str:
    env, st = report["environment"], report["stages"]
    lines = [f"# reproduce.py, {report['date']}", "",
             f"Device: {', '.join(env['devices'])} (backend {env['backend']}); JAX {env['jax']}, "
             f"PyTorch {env.get('torch')}; {env['cores']} host cores. Width {report['settings']['width']}, "
             f"budget {report['args']['budget_minutes']} min" + (" (--smoke: numbers mean nothing)"
                                                                 if report["settings"]["smoke"] else "") + ".", "",
             "| stage | status | wall s | compile s | device peak GB (process, so far) | invocations |",
             "|---|---|---|---|---|---|"]
    for name, s in st.items():
        lines.append(f"| {name} | {s['status']} | {s['wall_s']:.1f} | {s['compile_s']:.1f} | "
                     f"{_gb(s['device_peak_bytes'])} | {s['invocations']} |")
    for name, s in st.items():
        if name == "reference":
            continue
        lines += ["", f"## {name}", ""]
        if s.get("note"):
            lines.append(s["note"])
            continue
        lines += ["| model | done | accuracy | mean kernel retention | mean module F1 | time |", "|---|---|---|---|---|---|"]
        lines += _model_rows(s)
    if "reference" in st:
        lines += ["", "## the authors' code on the same device (same weights, same batch, interleaved)", "",
                  "| what | ours | authors' | ours / authors' | their device |", "|---|---|---|---|---|"]
        lines += _reference_rows(st["reference"])
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Validation accuracy and kernel retention per GradSplitter epoch, validation accuracy
    and fitness per CNNSplitter generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in report["stages"].get("gradsplitter", {}).get("models", {}).items():
        h = r.get("history") or []
        ax1.plot([e["val_accuracy"] for e in h], label=f"{name} val accuracy")
        ax1.plot([e["mean_retention"] for e in h], "--", label=f"{name} kernel retention")
    ax1.set(title="GradSplitter", xlabel="epoch")
    for name, r in report["stages"].get("cnnsplitter", {}).get("models", {}).items():
        h = r.get("history") or []
        ax2.plot([e["valid_accuracy"] for e in h], label=f"{name} valid accuracy")
        ax2.plot([e["best_fitness"] for e in h], "--", label=f"{name} best fitness")
    ax2.set(title="CNNSplitter", xlabel="generation")
    for ax in (ax1, ax2):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
