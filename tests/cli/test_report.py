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
