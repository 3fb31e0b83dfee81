"""Paper-scale runs on one device, in one command: train, GradSplitter, CNNSplitter, concern
identification (and, given checkouts, the authors' own code timed beside ours).

    python benchmarks/reproduce.py --budget-minutes 10 --data /usr/share/datasets/fashion-mnist \\
        --out results/reproduce [--reference-gradsplitter CHECKOUT] [--reference-cnnsplitter CHECKOUT]

On whatever device JAX finds, at full width, on Fashion-MNIST read from the IDX files in
``--data``. Stages, in order, each checkpointed (run the same command again and a cut-off
stage resumes where it stopped; a finished stage is not run again):

1. ``train``: the base models with the reference recipe (SGD 0.01, momentum 0.9, milestones
   at 30% / 60%, best-validation epoch; ResNet-20: the Keras recipe), SimCNN and ResCNN
   (GradSplitter's variants), SimCNN without BN (CNNSplitter's) and ResNet-20. Epochs are
   scaled to the stage's share of the budget from a measured step time (at most the
   reference's 200); the plan is written once to ``OUT/plan.json`` and kept on resume.
2. ``gradsplitter``: the full default schedule (5 head + 140 modularity-cycle epochs, all 10
   modules) on SimCNN and ResCNN, then module evaluation and composition. A schedule that
   does not fit the budget stops after a checkpointed epoch; the report gives the epochs done
   and the full schedule's time projected from the measured epochs.
3. ``cnnsplitter``: the reference's population and generations (preset ``simcnn_cifar10``:
   Fashion-MNIST has no preset of its own) on CNNSplitter's SimCNN.
4. ``concern``: concern identification of the ResNet-20 in the paper's three Table 1
   variants (CI+TI+MC, MC-BLN, MC-BLN + MC-BI).
5. ``mwt``: modular training (MwT) -- reported as not available until the method lands.
6. ``reference``: with ``--reference-gradsplitter`` / ``--reference-cnnsplitter``, the authors'
   GradSplitter classes and CNNSplitter fitness evaluation on the same device, same weights,
   same batch, interleaved with ours (``reproduce_reference.py``).

Budget: stage i may run until its cumulative share of ``--budget-minutes`` (``SHARES``);
time a stage leaves unused goes to the next. Writes ``OUT/report.json``, ``OUT/report.md``
(per stage: wall time, compile time, accuracies, kernel retention, F1, device peak memory)
and ``OUT/search_curves.png``. ``--smoke``: a tiny configuration of every stage (width 1/8,
one training epoch, 3 GradSplitter epochs on 256 images, 3 generations of 4), for the test
that runs the script on a small IDX set on a CPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peaks are the runs', not the pool's
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import environment, write_json  # noqa: E402

from cnnsplit_jax import checkpoint as ckpt  # noqa: E402
from cnnsplit_jax.pipeline import split_run, train_run  # noqa: E402
from cnnsplit_jax.splitters import CNNSplitterConfig, ConcernConfig, GradSplitterConfig  # noqa: E402
from cnnsplit_jax.splitters.cnnsplitter import PRESETS  # noqa: E402
from cnnsplit_jax.splitters.gradsplitter import phase_schedule  # noqa: E402
from cnnsplit_jax.train import RECIPES, TrainConfig  # noqa: E402

STAGES = ("train", "gradsplitter", "cnnsplitter", "concern", "mwt", "reference")
#: cumulative share of the budget by which each stage must end
SHARES = {"train": 0.25, "gradsplitter": 0.62, "cnnsplitter": 0.78, "concern": 0.88, "mwt": 0.88, "reference": 1.0}
#: base model -> the stage that needs it
MODELS = {"simcnn": "gradsplitter", "rescnn": "gradsplitter", "simcnn_cnnsplitter": "cnnsplitter",
          "resnet20": "concern"}
GA_PRESET = "simcnn_cifar10"
CONCERN_VARIANTS = {"none": "CI+TI+MC", "bln": "MC-BLN", "bi": "MC-BLN + MC-BI"}
DATASET = "fashion_mnist"


class OutOfBudget(Exception):
    """A stage reached its share of the budget after a checkpoint; the same command resumes it."""


class Clock:
    """Deadlines: stage ``s`` may run until ``start + SHARES[s] * budget``."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def deadline(self, stage: str) -> float:
        return self.start + SHARES[stage] * self.budget_s

    def left(self, stage: str) -> float:
        return self.deadline(stage) - time.perf_counter()

    def guard(self, deadline: float, stages=("epoch", "generation")):
        """A progress callback that stops the loop after a unit of work (its checkpoint is
        written before the event) when one more unit as long as the last would pass ``deadline``."""
        last = [time.perf_counter()]

        def cb(p):
            if p.stage not in stages:
                return
            now = time.perf_counter()
            took, last[0] = now - last[0], now
            if now + took > deadline and p.index + 1 < p.total:
                raise OutOfBudget(f"stopped after {p.stage} {p.index + 1} of {p.total}")
        return cb


class Compiles:
    """Seconds JAX spent tracing, lowering and compiling since it was made (all threads)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **_):
        if event in self.EVENTS:
            self.total += duration

    def close(self) -> None:
        """Stop listening (JAX's listeners are process-wide: each ``main`` call removes its own)."""
        jax.monitoring.unregister_event_duration_listener(self._on)


def device_peak_bytes() -> int | None:
    """The device's peak bytes in use by this process so far (None where the backend keeps no
    statistics, as the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run decomposes at which scale (``--smoke``: tiny, for the test)."""

    width: float = 1.0
    train_images: int | None = None  # GradSplitter's images per epoch (None: the whole training split)
    grad: GradSplitterConfig = GradSplitterConfig()
    ga: CNNSplitterConfig = CNNSplitterConfig(**PRESETS[GA_PRESET])
    concern: dict = dataclasses.field(default_factory=dict)
    fixed_epochs: int | None = None  # no calibration: this many epochs per model
    grad_models: tuple[str, ...] = ("simcnn", "rescnn")


def settings(a) -> Settings:
    if not a.smoke:
        return Settings(width=a.width, train_images=a.grad_train_images)
    return Settings(
        width=0.125, train_images=256, fixed_epochs=1, grad_models=("simcnn",),
        grad=GradSplitterConfig(head_epochs=1, modularity_epochs=2, cycle_mod=1, cycle_head=1, batch_size=64),
        ga=CNNSplitterConfig(**{**PRESETS[GA_PRESET], "population": 4, "generations": 2, "num_parents": 2,
                                "keep_parents": 1, "eval_images": 64}),
        concern={"concerned_per_class": 4, "min_confidence": None})


def train_config(arch: str, epochs: int) -> tuple[TrainConfig, str]:
    """The reference recipe for ``arch`` with ``epochs`` (milestones stay fractions)."""
    if arch.startswith("resnet"):
        return TrainConfig(**{**RECIPES["resnet"], "epochs": epochs}), "resnet"
    return TrainConfig(epochs=epochs), "reference"


# ---------------------------------------------------------------------------------- stages

def _step_seconds(out: Path, arch: str, s: Settings, data: str, steps: int = 12) -> tuple[float, int]:
    """(median seconds of a training step after the compiling first ones, steps per epoch),
    from the first steps of a throwaway run."""
    marks, per_epoch = [], [0]

    def cb(p):
        if p.stage == "step":
            marks.append(time.perf_counter())
            per_epoch[0] = p.steps
            if len(marks) >= steps + 3:
                raise OutOfBudget("calibrated")

    tmp = out / f".calibrate-{arch}"
    cfg, recipe = train_config(arch, 200)
    try:
        train_run(tmp, arch, DATASET, cfg, width=s.width, recipe=recipe, data_dir=data, overwrite=True,
                  callbacks=cb)
    except OutOfBudget:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gaps = np.diff(marks[2:])
    return (float(statistics.median(gaps)) if len(gaps) else float("inf")), per_epoch[0]


def plan_training(out: Path, archs: list[str], s: Settings, data: str, clock: Clock) -> dict:
    """Epochs per model, written once to ``OUT/plan.json`` (a resume keeps the plan)."""
    path = out / "plan.json"
    plan = json.loads(path.read_text()) if path.exists() else {}
    todo = [a for a in archs if a not in plan]
    if todo:
        timing = {a: (None, None) if s.fixed_epochs else _step_seconds(out, a, s, data) for a in todo}
        share = max(clock.left("train"), 0.0) / len(todo)
        for a in todo:
            step_s, steps = timing[a]
            epoch_s = None if step_s is None else step_s * steps * 1.1  # + the validation pass
            fits = share // epoch_s if epoch_s and np.isfinite(epoch_s) else 1  # no step measured: one epoch
            epochs = s.fixed_epochs or int(max(1, min(200, fits)))
            plan[a] = {"epochs": epochs, "step_s": step_s, "steps_per_epoch": steps, "epoch_s_estimate": epoch_s}
        write_json(str(path), plan)
    return plan


def stage_train(out: Path, s: Settings, data: str, clock: Clock, archs: list[str]) -> dict:
    plan = plan_training(out, archs, s, data, clock)
    rows = {}
    for i, arch in enumerate(archs):
        run = out / arch
        if not (run / "train.json").exists():
            cfg, recipe = train_config(arch, plan[arch]["epochs"])
            left = clock.deadline("train") - time.perf_counter()
            stop = clock.guard(time.perf_counter() + left / (len(archs) - i))
            try:
                train_run(run, arch, DATASET, cfg, width=s.width, recipe=recipe, data_dir=data, callbacks=stop,
                          resume=ckpt.progress_exists(run, "train_state"))
            except OutOfBudget:  # the plan underestimated an epoch: resumed by the next invocation
                done = json.loads((run / "train_state.json").read_text())["epoch"] + 1
                rows[arch] = {"finished": False, "epochs_done": done, "plan": plan[arch]}
                continue
        tr = json.loads((run / "train.json").read_text())
        rows[arch] = {k: tr[k] for k in ("test_accuracy", "val_accuracy", "best_epoch", "epochs", "train_seconds",
                                         "num_kernels", "width")} | {"plan": plan[arch]}
    return {"models": rows}


def _split_row(mods: Path, progress: str | None) -> dict:
    """A module set's figures, or the progress of a search cut off before it finished."""
    if (mods / "split.json").exists():
        sp = json.loads((mods / "split.json").read_text())
        row = {k: sp.get(k) for k in ("base_accuracy", "composed_accuracy", "base_top5", "composed_top5",
                                      "mean_kernel_retention", "mean_module_f1", "search_seconds",
                                      "decomposition_seconds", "epochs", "selected_epoch", "best_generation",
                                      "mean_jaccard", "eval_images", "test_images")}
        row["history"] = sp.get("history")
        row["finished"] = True
        return row
    p = mods / f"{progress}.json" if progress else None
    hist = json.loads(p.read_text()).get("history", []) if p and p.exists() else []
    return {"finished": False, "history": hist, "units_done": len(hist)}


def _epoch_seconds(history: list[dict]) -> list[float]:
    t = [h["seconds"] for h in history]
    return [b - a for a, b in zip([0.0] + t[:-1], t)]


def stage_grad(out: Path, s: Settings, data: str, clock: Clock) -> dict:
    rows, archs = {}, s.grad_models
    total = len(phase_schedule(s.grad))
    for i, arch in enumerate(archs):
        mods = out / f"{arch}-grad"
        try:
            if not (mods / "split.json").exists():
                left = clock.deadline("gradsplitter") - time.perf_counter()
                stop = clock.guard(time.perf_counter() + left / (len(archs) - i))
                split_run(out / arch, mods, "grad", s.grad, train_subset=s.train_images, callbacks=stop, data_dir=data,
                          resume=ckpt.progress_exists(mods, "search"))
        except OutOfBudget:
            pass
        row = _split_row(mods, "search")
        per = _epoch_seconds(row["history"] or [])
        row.update(schedule_epochs=total, epochs_done=len(per))
        if len(per) > 1:  # the first epoch compiles; project the rest from the later ones
            row["median_epoch_s"] = statistics.median(per[1:])
            row["projected_schedule_s"] = per[0] + row["median_epoch_s"] * (total - 1)
        rows[arch] = row
    return {"models": rows, "config": ckpt.config_json(s.grad), "train_images": s.train_images}


def stage_ga(out: Path, s: Settings, data: str, clock: Clock) -> dict:
    mods = out / "simcnn_cnnsplitter-ga"
    try:
        if not (mods / "split.json").exists():
            split_run(out / "simcnn_cnnsplitter", mods, "ga", s.ga, data_dir=data,
                      callbacks=clock.guard(clock.deadline("cnnsplitter")), resume=ckpt.progress_exists(mods, "ga"))
    except OutOfBudget:
        pass
    row = _split_row(mods, "ga")
    per = [h["seconds"] for h in row["history"] or []]
    row.update(generations_planned=s.ga.generations + 1, generations_done=len(per))
    if len(per) > 1:
        row["median_generation_s"] = statistics.median(per[1:])
    return {"models": {"simcnn_cnnsplitter": row}, "preset": GA_PRESET, "config": ckpt.config_json(s.ga)}


def stage_concern(out: Path, s: Settings, data: str, clock: Clock) -> dict:
    rows = {}
    for bt in CONCERN_VARIANTS:
        mods = out / f"resnet20-concern-{bt}"
        if not (mods / "split.json").exists():
            if clock.left("concern") <= 0:
                rows[bt] = {"finished": False, "history": None, "note": "no budget left"}
                continue
            split_run(out / "resnet20", mods, "concern", ConcernConfig(backtrack=bt, **s.concern), data_dir=data)
        rows[bt] = _split_row(mods, None)
    return {"models": rows, "variants": CONCERN_VARIANTS}


def stage_reference(out: Path, s: Settings, a) -> dict:
    import reproduce_reference as ref

    res = {}
    if a.reference_gradsplitter:
        res["gradsplitter"] = ref.gradsplitter_rows(a.reference_gradsplitter, out, a.data,
                                                    rounds=a.reference_rounds)
    if a.reference_cnnsplitter:
        res["cnnsplitter"] = ref.cnnsplitter_row(a.reference_cnnsplitter, out / "simcnn_cnnsplitter", s.ga, a.data,
                                                 rounds=a.reference_rounds)
    return res


# ---------------------------------------------------------------------------------- driver

def run_stage(name: str, fn, out: Path, compiles: Compiles, covers=lambda rec: True) -> dict:
    """Run ``fn`` unless a finished record exists that ``covers`` what is asked now; time it,
    add compile time and the device's peak."""
    path = out / "stages" / f"{name}.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    if before.get("status") == "done" and covers(before):
        return before
    t0, c0 = time.perf_counter(), compiles.total
    rec = fn()
    finished = all(r.get("finished", True) for r in rec.get("models", {}).values())
    rec.update(stage=name, status="done" if finished else "partial",
               wall_s=before.get("wall_s", 0.0) + time.perf_counter() - t0,
               compile_s=before.get("compile_s", 0.0) + compiles.total - c0,
               device_peak_bytes=device_peak_bytes(), invocations=before.get("invocations", 0) + 1)
    write_json(str(path), rec)
    return rec


def avoid_triton_gemm() -> None:
    """XLA's Triton GEMM pass aborts compiling a ResNet-20's node forward on GPUs
    (docs/performance.md, "an XLA crash to avoid"): cuBLAS takes those matmuls. Set before the
    backend starts (ignored by the CPU; no effect once a backend runs)."""
    if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-minutes", type=float, required=True)
    p.add_argument("--data", required=True, help="folder with Fashion-MNIST's IDX files")
    p.add_argument("--out", required=True)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--grad-train-images", type=int, default=None,
                   help="GradSplitter's images per epoch (default: the whole training split, as the reference)")
    p.add_argument("--reference-gradsplitter", metavar="CHECKOUT")
    p.add_argument("--reference-cnnsplitter", metavar="CHECKOUT")
    p.add_argument("--reference-rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny configuration, to test the script (numbers mean nothing)")
    a = p.parse_args(argv)
    if a.budget_minutes <= 0:
        p.error("--budget-minutes must be > 0")
    avoid_triton_gemm()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s, clock, compiles = settings(a), Clock(60 * a.budget_minutes), Compiles()
    wanted = set(a.stages) | ({"gradsplitter"} if a.reference_gradsplitter else set()) | \
        ({"cnnsplitter"} if a.reference_cnnsplitter else set())
    archs = [m for m, st in MODELS.items() if st in wanted and (st != "gradsplitter" or m in s.grad_models)]
    work = {
        "train": lambda: stage_train(out, s, a.data, clock, archs),
        "gradsplitter": lambda: stage_grad(out, s, a.data, clock),
        "cnnsplitter": lambda: stage_ga(out, s, a.data, clock),
        "concern": lambda: stage_concern(out, s, a.data, clock),
        "mwt": lambda: {"models": {}, "note": "MwT is not implemented yet (issue 27): nothing to run"},
        "reference": lambda: stage_reference(out, s, a),
    }
    stages = {}
    try:
        for name in STAGES:
            if name not in a.stages or (name == "reference" and not (a.reference_gradsplitter
                                                                     or a.reference_cnnsplitter)):
                continue
            print(f"[reproduce] {name} (until {SHARES[name] * a.budget_minutes:.1f} min)", flush=True)
            covers = (lambda rec: set(archs) <= set(rec["models"])) if name == "train" else (lambda rec: True)
            stages[name] = run_stage(name, work[name], out, compiles, covers)
            print(f"[reproduce] {name}: {stages[name]['status']} in {stages[name]['wall_s']:.1f} s", flush=True)
            if name == "train" and stages[name]["status"] != "done":
                print("[reproduce] a base model is not trained yet: run the same command again to continue",
                      flush=True)
                break
    finally:
        compiles.close()
    import reproduce_report

    report = {"environment": {**environment(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
              "date": time.strftime("%Y-%m-%d"), "args": vars(a),
              "settings": {"width": s.width, "train_images": s.train_images, "dataset": DATASET,
                           "smoke": a.smoke}, "stages": stages}
    write_json(str(out / "report.json"), report)
    (out / "report.md").write_text(reproduce_report.markdown(report))
    reproduce_report.plot(report, out / "search_curves.png")
    print(f"[reproduce] wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'search_curves.png'}")
    return 0 if all(st["status"] == "done" for st in stages.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
