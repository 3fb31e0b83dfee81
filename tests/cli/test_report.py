"""In a run of several processes only process 0 prints progress lines and warnings."""

from cnnsplit_jax import distributed as dist
from cnnsplit_jax.cli import _show_warning
from cnnsplit_jax.cli.report import ProgressPrinter, log
from cnnsplit_jax.pipeline import RunWarning
from cnnsplit_jax.progress import Progress


def test_only_process_0_logs(monkeypatch, capsys):
    printer = ProgressPrinter(line=lambda p: f"epoch {p.index + 1}/{p.total}")
    event = Progress("epoch", 0, 3)
    for primary, want in ((True, "epoch 1/3\nstatus\nwarning: late\n"), (False, "")):
        monkeypatch.setattr(dist, "is_primary", lambda primary=primary: primary)
        printer(event)
        log("status")
        _show_warning(RunWarning("late"), RunWarning, "f.py", 1)
        assert capsys.readouterr().err == want


def test_undefined_f1_is_printed_as_undefined_and_stored_as_null():
    import json

    import numpy as np

    from cnnsplit_jax.cli.report import class_table, module_table, patch_table
    from cnnsplit_jax.evaluate import classification_report, module_prf

    # module 1 never fires: its precision and F1 are 0/0
    prf = module_prf(np.array([[True, False], [False, False], [True, False]]), np.array([0, 1, 0]))
    assert prf[1] == (None, 0.0, None)
    res = {"module_precision": [p for p, _, _ in prf], "module_recall": [r for _, r, _ in prf],
           "module_f1": [f for _, _, f in prf], "kernel_retention": [0.5, 0.25], "base_accuracy": 0.9,
           "composed_accuracy": 0.8, "mean_kernel_retention": 0.375, "mean_jaccard": 0.1}
    rows = module_table(res, ["a", "b"]).splitlines()
    assert rows[3] == "| b | undefined | 0.000 | undefined | 0.250 |"
    assert json.loads(json.dumps(res))["module_f1"] == [1.0, None]
    rep = classification_report(np.array([0, 0, 0]), np.array([0, 0, 1]), ["x", "y"])
    assert class_table(rep).splitlines()[3] == "| y | undefined | 0.000 | undefined |"
    before = {"precision": None, "recall": 0.0, "f1": None, "accuracy": 0.5}
    after = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 0.5}
    assert patch_table({"before": before, "after": after}).splitlines()[2] == "| before | undefined | 0.000 | undefined | 0.5000 |"
