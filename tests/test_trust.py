"""Loading an artefact runs no code the user did not ask for, and a damaged or mismatched one
never gives a quiet wrong answer: crafted definitions and data paths, flipped checkpoint
bytes, a kill between a save's renames, resumes of another run, two writers of one directory,
one kind of model written over another."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import cnnsplit_jax as cs
from cnnsplit_jax import checkpoint as ckpt
from cnnsplit_jax.cli import main
from cnnsplit_jax.pipeline import prepare_out, run_lock, split_run, train_run
from cnnsplit_jax.splitters import GradSplitterConfig
from cnnsplit_jax.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _errors(capsys) -> list[str]:
    """The ``error:`` lines the CLI printed (progress lines aside): one per failure."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _planted(root: Path) -> tuple[Path, Path]:
    """A module ``planted_mod`` in ``root`` that writes a marker file when imported, and another
    when its ``build`` is called."""
    imported, called = root / "IMPORTED", root / "CALLED"
    (root / "planted_mod.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(imported)!r}).write_text("imported")

        def build():
            Path({str(called)!r}).write_text("called")
            raise SystemExit("never here")
    """))
    return imported, called


def _craft_adapted(run: Path) -> None:
    """Turn the run directory ``run`` (a trained zoo model) into one that claims to be an
    adapted model whose definition is ``planted_mod:build``."""
    meta = json.loads((run / "model.json").read_text())
    meta["adapted"] = {"definition": "planted_mod:build", "input_shape": [32, 32, 1], "kind": "kernel",
                       "num_classes": 10, "name": "Evil", "apply_kwargs": {}, "framework": "linen",
                       "points": [["conv_0", ["conv_0"]]]}
    (run / "model.json").write_text(json.dumps(meta))


def test_a_crafted_definition_is_never_imported_without_the_opt_in(digits_run, digits_modules, tmp_path,
                                                                  monkeypatch, capsys):
    imported, called = _planted(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # even where the planted module is importable
    run, mods = tmp_path / "run", tmp_path / "mods"
    shutil.copytree(digits_run, run)
    shutil.copytree(digits_modules, mods)
    _craft_adapted(run)
    _craft_adapted(mods / "base")
    with pytest.raises(ckpt.UntrustedDefinitionError, match="would import the module 'planted_mod' and call build"):
        ckpt.load_model(run)
    with pytest.raises(ckpt.UntrustedDefinitionError, match="--trust-definition"):
        cs.load_module_set(mods)
    assert main(["info", str(run)]) == 0  # the metadata, without the model
    out = capsys.readouterr().out
    assert "planted_mod:build (not imported" in out and "conv_0" in out
    for argv in (["evaluate", str(mods)], ["split", "--model-dir", str(run), "--out", str(tmp_path / "s")],
                 ["compose", "--modules", str(mods), "--out", str(tmp_path / "c")]):
        assert main(argv) == 2
        (err,) = _errors(capsys)
        assert "holds an adapted model" in err
    assert not imported.exists() and not called.exists()
    # the opt-in imports it (and says so): the markers prove that only then does code run
    with pytest.raises(SystemExit, match="never here"), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ckpt.load_model(run, trust_definition=True)
    assert any("imports and calls 'planted_mod:build'" in str(w.message) for w in said)
    assert imported.exists() and called.exists()


def test_python_m_does_not_import_from_the_current_directory(digits_run, tmp_path):
    """``python -m cnnsplit_jax`` run from a directory holding the planted module: even with
    --trust-definition the module is not found there (the cnnsplit script never had the
    current directory on its path)."""
    imported, called = _planted(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    _craft_adapted(run)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = subprocess.run([sys.executable, "-m", "cnnsplit_jax", "info", str(run), "--trust-definition"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 2, got.stderr
    assert "cannot import the model definition 'planted_mod:build'" in got.stderr
    assert not imported.exists() and not called.exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/nonexistent")


def test_data_paths_never_come_from_an_artefact_and_cifar_batches_hold_arrays_only(digits_modules, tmp_path,
                                                                                   monkeypatch):
    global MARKER
    MARKER = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (evil / name).write_bytes(pickle.dumps({"data": _Payload(), "labels": [0]}))
    monkeypatch.delenv("CNNSPLIT_DATA", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    mods = tmp_path / "mods"
    shutil.copytree(digits_modules, mods)
    meta = json.loads((mods / "modules.json").read_text())
    (mods / "modules.json").write_text(json.dumps({**meta, "dataset": "cifar10", "data_dir": str(evil)}))
    with pytest.raises(cs.DatasetError, match="not found"):  # the artefact's data_dir is not read
        cs.pipeline.evaluate_run(mods)
    assert not MARKER.exists()
    # a data directory the user names is read, but a batch that names code is refused
    with pytest.raises(cs.DatasetError, match="refusing to load posix.system|refusing to load os.system"):
        cs.load_dataset("cifar10", str(evil))
    assert not MARKER.exists()


def _flip(directory: Path) -> None:
    """XOR 64 bytes in the middle of the largest file under ``directory`` (its array data)."""
    f = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    b = bytearray(f.read_bytes())
    for i in range(64):
        b[len(b) // 2 + i] ^= 0xFF
    f.write_bytes(bytes(b))


def test_flipped_checkpoint_bytes_are_reported(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    _flip(run / "model")
    with pytest.raises(ckpt.CheckpointError, match=r"does not match the checksum written with it") as e:
        ckpt.load_model(run)
    assert str(run / "model") in str(e.value) and "['" in str(e.value)  # names the file and the array
    assert main(["info", str(run)]) == 2
    err = capsys.readouterr().err
    assert "does not match the checksum" in err and len(err.strip().splitlines()) == 2  # + the --verbose hint
    # a resumable loop's checkpoint: the resume is refused
    tree = {"w": jnp.arange(4096.0)}
    ckpt.save_progress(tmp_path / "loop", "state", tree, {"epoch": 0, "config": {}})
    _flip(tmp_path / "loop" / "state")
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_progress(tmp_path / "loop", "state", tree, {})


def test_a_kill_between_the_renames_of_a_save_is_recovered(tmp_path):
    path = tmp_path / "t"
    ckpt.save_tree(path, {"a": jnp.zeros(3)}, extra_json={"config": {}, "epoch": 0})
    ckpt.save_tree(tmp_path / "new", {"a": jnp.ones(3)}, extra_json={"config": {}, "epoch": 1})
    # killed after "t -> t.old" and before "t.tmp -> t": the new tree is complete in t.tmp
    os.replace(path, tmp_path / "t.old")
    os.replace(tmp_path / "new", tmp_path / "t.tmp")
    assert ckpt.progress_exists(tmp_path, "t")
    np.testing.assert_array_equal(ckpt.load_tree(path, {"a": jnp.zeros(3)})["a"], np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    # killed while writing t.tmp (no manifest yet) after t moved away: the old tree comes back
    os.replace(path, tmp_path / "t.old")
    (tmp_path / "t.tmp").mkdir()
    np.testing.assert_array_equal(ckpt.load_tree(path, {"a": jnp.zeros(3)})["a"], np.ones(3))
    ckpt.save_tree(path, {"a": jnp.full(3, 2.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def _interrupt_after(n):
    class Stop(Exception):
        pass

    def cb(p):
        if p.stage == "epoch" and p.index + 1 >= n:
            raise Stop
    return Stop, cb


def test_a_resume_of_another_run_is_refused_naming_the_key(digits_run, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=0)
    Stop, cb = _interrupt_after(1)
    with pytest.raises(Stop):
        train_run(tmp_path / "t", "simcnn", "digits", cfg, width=0.0625, callbacks=cb)
    reversed_labels = "digits:" + ",".join(str(c) for c in range(9, -1, -1))  # the same images, labels reversed
    with pytest.raises(ckpt.CheckpointError, match=r"dataset spec was \"digits\", now \"digits:9,8") as e:
        train_run(tmp_path / "t", "simcnn", reversed_labels, cfg, width=0.0625, resume=True)
    assert "training data digest was" in e.value.detail
    with pytest.raises(ckpt.CheckpointError, match=r"model.width was 0.0625, now 0.125"):
        train_run(tmp_path / "t", "simcnn", "digits", cfg, width=0.125, resume=True)
    with pytest.raises(ckpt.CheckpointError, match=r"^cannot resume .*: it is another run \(lr was 0.05, now 0.1\)"):
        train_run(tmp_path / "t", "simcnn", "digits", TrainConfig(**{**ckpt.config_json(cfg), "lr": 0.1,
                                                                      "lr_milestones": (0.3, 0.6)}),
                  width=0.0625, resume=True)

    gcfg = GradSplitterConfig(head_epochs=2, modularity_epochs=0)
    Stop, cb = _interrupt_after(1)
    with pytest.raises(Stop):
        split_run(digits_run, tmp_path / "m", "grad", gcfg, train_subset=300, callbacks=cb)
    with pytest.raises(ckpt.CheckpointError, match="train subset was 300, now 200"):
        split_run(digits_run, tmp_path / "m", "grad", gcfg, train_subset=200, resume=True)
    other = tmp_path / "copy"
    shutil.copytree(digits_run, other)  # the same weights in another run directory
    with pytest.raises(ckpt.CheckpointError, match="base run was"):
        split_run(other, tmp_path / "m", "grad", gcfg, train_subset=300, resume=True)
    res = split_run(digits_run, tmp_path / "m", "grad", gcfg, train_subset=300, resume=True)  # the same run resumes
    assert res["epochs"] == 2


def test_one_kind_of_model_never_replaces_another_and_one_writer_per_directory(digits_run, tmp_path, capsys):
    adapted = tmp_path / "adapted"
    adapted.mkdir()
    for name in ("model.json", "adapt.json"):
        (adapted / name).write_text("{}")
    (adapted / "model").mkdir()
    assert cs.pipeline.artifact_kind(adapted) == "adapted_model" and cs.pipeline.artifact_kind(digits_run) == "model"
    with pytest.raises(ValueError, match="already holds an adapted model; choose another --out, or pass --overwrite"):
        train_run(adapted, "simcnn", "digits", TrainConfig(epochs=1), width=0.0625)
    adapting = {"in_progress": True, "resumable": False}  # what adapt_run checks before it writes
    with pytest.raises(ValueError, match="already holds a model"):
        prepare_out(digits_run, "adapted_model", **adapting)
    with pytest.raises(ValueError, match="already holds an adapted model; pass --overwrite to replace it"):
        prepare_out(adapted, "adapted_model", **adapting)
    assert sorted(p.name for p in adapted.iterdir()) == ["adapt.json", "model", "model.json"]

    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        os.makedirs({str(out)!r}, exist_ok=True)
        f = open(os.path.join({str(out)!r}, ".cnnsplit.lock"), "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("pid %d" % os.getpid()); f.flush()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--model", "simcnn", "--dataset", "digits", "--width", "0.0625", "--epochs", "1",
                     "--out", str(out)]) == 2
        (err,) = _errors(capsys)
        assert f"is being written by another cnnsplit run (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".cnnsplit.lock"]  # the holder's: not touched
    (out / ".cnnsplit.lock").unlink()
    out.rmdir()
    with run_lock(out):  # free again once the other process is gone; re-entrant within one
        with run_lock(out):
            assert (out / ".cnnsplit.lock").read_text() == f"pid {os.getpid()}\n"
    assert not out.exists()  # the lock file and the directory it created are removed


def test_os_errors_and_bad_numbers_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["train", "--model", "simcnn", "--dataset", "digits", "--width", "0.0625", "--epochs", "1"]
    assert main(argv + ["--out", str(blocker / "run")]) == 2  # a directory under a file
    (err,) = _errors(capsys)
    assert "Not a directory" in err or "File exists" in err
    for flags, says in ((["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
                        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
                        (["--epochs", "-2"], "epochs must be an integer >= 1, got -2"),
                        (["--lr", "nan"], "lr must be a finite number > 0, got nan")):
        assert main([*argv[:-2], *flags, "--out", str(tmp_path / "r")]) == 2
        (err,) = _errors(capsys)
        assert says in err, err
    assert not (tmp_path / "r").exists()  # nothing was trained or written
