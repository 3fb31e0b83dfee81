"""benchmarks/reproduce.py at a tiny scale on a CPU: every stage runs, a cut-off stage resumes,
and the report has every section (the paper-scale run is for a device; see docs/performance.md)."""

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import reproduce  # noqa: E402

from cnnsplit_jax.progress import Progress  # noqa: E402


def _idx(path: Path, arr: np.ndarray) -> None:
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def _tiny_fashion(d: Path, per_class: int) -> Path:
    """IDX files of 10 separable classes: a bright 7x7 square at a class's place, plus noise."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("t10k", 3)):  # few test images: ResNet module outputs are slow on CPUs
        y = np.repeat(np.arange(10), n).astype(np.uint8)
        x = rng.integers(0, 60, (len(y), 28, 28))
        for i, c in enumerate(y):
            r, k = divmod(int(c), 4)
            x[i, 2 + 8 * r: 9 + 8 * r, 1 + 7 * k: 8 + 7 * k] += 180
        _idx(d / f"{split}-images-idx3-ubyte.gz", x)
        _idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


def test_the_budget_guard_stops_after_a_unit_that_would_end_past_the_deadline(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(reproduce.time, "perf_counter", lambda: now[0])
    clock = reproduce.Clock(budget_s=100.0)
    guard = clock.guard(deadline=130.0)
    now[0] = 110.0
    guard(Progress("epoch", 0, 5))  # took 10 s, the next would end at 120 < 130
    guard(Progress("step", 1, 5))  # steps are not units of work: ignored
    now[0] = 125.0
    with pytest.raises(reproduce.OutOfBudget, match="after epoch 2 of 5"):
        guard(Progress("epoch", 1, 5))  # took 15 s: 140 > 130
    now[0] = 500.0
    guard(Progress("epoch", 4, 5))  # the last unit: nothing left to stop
    assert clock.deadline("gradsplitter") == pytest.approx(100.0 + 100.0 * reproduce.SHARES["gradsplitter"])


def test_rgb_equivalent_is_the_same_function():
    pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    import reproduce_reference as ref
    from cnnsplit_jax.models import build_model

    x = np.random.default_rng(1).normal(size=(4, 32, 32, 1)).astype(np.float32)
    for arch in ("rescnn",):  # BN and shortcuts after the first conv
        m = build_model(arch, num_classes=10, in_channels=1, width=0.125, key=jax.random.key(3))
        m3 = ref.rgb_equivalent(m)
        assert m3.in_channels == 3 and m3.width == m.width
        a, b = np.asarray(m(jnp.asarray(x))), np.asarray(m3(jnp.asarray(np.repeat(x, 3, -1))))
        assert np.abs(a).max() > 1e-3
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)


def test_smoke_run_resumes_a_cut_off_stage_and_reports_every_section(tmp_path, capsys):
    data = _tiny_fashion(tmp_path / "idx", per_class=30)
    out = tmp_path / "out"
    args = ["--smoke", "--data", str(data), "--out", str(out)]
    # a budget long spent: training (fixed at one epoch) ends, GradSplitter stops after one epoch
    assert reproduce.main(args + ["--budget-minutes", "0.001", "--stages", "train", "gradsplitter"]) == 3
    first = json.loads((out / "stages" / "gradsplitter.json").read_text())
    assert first["status"] == "partial"
    assert first["models"]["simcnn"]["epochs_done"] == 1
    assert reproduce.main(args + ["--budget-minutes", "30"]) == 0
    rep = json.loads((out / "report.json").read_text())
    st = rep["stages"]
    assert list(st) == ["train", "gradsplitter", "cnnsplitter", "concern", "mwt"]
    assert all(s["status"] == "done" for s in st.values())
    assert set(st["train"]["models"]) == {"simcnn", "simcnn_cnnsplitter", "resnet20"}  # --smoke: no ResCNN
    assert st["train"]["models"]["simcnn"]["epochs"] == 1
    grad = st["gradsplitter"]
    assert grad["invocations"] == 2 and grad["wall_s"] > first["wall_s"]
    for m in ("simcnn",):
        r = grad["models"][m]
        assert r["finished"] and r["epochs_done"] == r["schedule_epochs"] == 3
        assert [h["epoch"] for h in r["history"]] == [0, 1, 2]  # resumed, not restarted
        assert 0.0 <= r["composed_accuracy"] <= 1.0 and 0.0 < r["mean_kernel_retention"] <= 1.0
    ga = st["cnnsplitter"]["models"]["simcnn_cnnsplitter"]
    assert ga["finished"] and ga["generations_done"] == 3 and ga["median_generation_s"] > 0
    rows = [grad["models"]["simcnn"], ga, *st["concern"]["models"].values()]
    assert all(r["eval_images"] + r["test_images"] == 30 for r in rows)  # the --data set's test split, no other
    assert set(st["concern"]["models"]) == {"none", "bln", "bi"}
    assert all(r["finished"] for r in st["concern"]["models"].values())
    assert st["train"]["compile_s"] > 0 and st["cnnsplitter"]["compile_s"] > 0
    md = (out / "report.md").read_text()
    for section in ("## train", "## gradsplitter", "## cnnsplitter", "## concern", "## mwt", "MwT is not implemented"):
        assert section in md
    assert "n/a (no device statistics)" in md  # the CPU keeps none; a GPU's peak is a number
    assert (out / "search_curves.png").stat().st_size > 5000
    assert json.loads((out / "plan.json").read_text())["resnet20"]["epochs"] == 1
