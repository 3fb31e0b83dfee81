"""Several processes joined by ``jax.distributed`` (gloo on the CPU): two local processes with
2 simulated devices each run a small GradSplitter search (killed after epoch 1, then resumed)
and a composition; both end with the single-process results, and only process 0 writes."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import cnnsplit_jax as cs
from cnnsplit_jax import distributed as dist
from cnnsplit_jax.cli import main
from cnnsplit_jax.splitters import gradsplitter as gs

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost" / "worker.py"


def test_settings_come_from_arguments_or_environment_and_are_checked(monkeypatch):
    assert dist.settings(env={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert dist.settings(env=env) == {"coordinator": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert dist.settings(process_id=0, env=env)["process_id"] == 0  # an argument beats the environment
    cases = [({"coordinator": "h:1"}, "missing: num_processes (--num-processes or JAX_NUM_PROCESSES), process_id"),
             ({"coordinator": "h", "num_processes": 2, "process_id": 0}, "expected HOST:PORT"),
             ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "process_id=2 is outside 0..1"),
             ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, "num_processes=0: at least 1"),
             ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, "must be an integer")]
    for kw, msg in cases:
        with pytest.raises(dist.DistributedError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            dist.settings(env={}, **kw)
    for name in dist.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert dist.initialize() is False  # nothing asks for several processes: nothing done
    assert dist.process_count() == 1 and dist.is_primary() and not dist.is_initialized()
    x = jax.numpy.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(dist.host({"a": x})["a"], np.arange(6.0).reshape(2, 3))


def test_cli_rejects_incomplete_process_settings_before_any_work(tmp_path, capsys):
    rc = main(["train", "--model", "simcnn", "--dataset", "digits", "--out", str(tmp_path / "r"),
               "--coordinator", "localhost:1", "--process-id", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing: num_processes (--num-processes or JAX_NUM_PROCESSES)" in err
    assert not (tmp_path / "r").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _pair(out: Path, mode: str) -> list[tuple[int, dict]]:
    """Run the worker as processes 0 and 1; (return code, its JSON line) of each."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(out), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    res = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        lines = [ln for ln in so.splitlines() if ln.startswith("{")]
        assert lines, f"process exited {p.returncode} without a result:\n{so[-2000:]}\n{se[-3000:]}"
        res.append((p.returncode, json.loads(lines[-1])))
    return res


@pytest.mark.slow
def test_two_processes_search_resume_compose_and_only_process_0_writes(tmp_path):
    ds = cs.load_dataset("digits")
    data = cs.SplitData(ds.x_train[:192], ds.y_train[:192], ds.x_train[192:320], ds.y_train[192:320],
                        ds.info.mean, ds.info.std)
    model = cs.build_model("simcnn", num_classes=10, in_channels=1, width=0.0625, key=0)
    cfg = cs.GradSplitterConfig(head_epochs=1, modularity_epochs=2, cycle_mod=1, cycle_head=1, batch_size=64,
                                lr_modularity=0.05)
    ref = gs.split(jax.random.key(0), model, data, cfg)  # one process, one device
    cs.save_model(tmp_path / "base", model)  # one process's checkpoint: the workers load it
    ref_scores = cs.predict_scores(cs.compose([cs.Pick(ref.module_set, c) for c in range(10)]), ds.x_test[:50])

    killed = _pair(tmp_path, "kill")
    assert [rc for rc, _ in killed] == [-signal.SIGKILL] * 2
    assert killed[1][1]["writes"] == [], killed[1][1]["writes"]  # process 1 never wrote
    assert any("search/search.json" in w for w in killed[0][1]["writes"]), killed[0][1]["writes"]
    progress = json.loads((tmp_path / "search" / "search.json").read_text())
    assert [h["epoch"] for h in progress["history"]] == [0, 1]

    resumed = _pair(tmp_path, "resume")
    assert [rc for rc, _ in resumed] == [0, 0]
    for i, (_, r) in enumerate(resumed):
        assert r["process"] == i and [h["epoch"] for h in r["history"]] == [0, 1, 2]
        for h, h1 in zip(r["history"], ref.history):
            assert h["loss"] == pytest.approx(h1["loss"], abs=1e-4)
            assert h["val_accuracy"] == pytest.approx(h1["val_accuracy"], abs=1e-9)
            assert h["mean_kernels"] == h1["mean_kernels"]
        for k, v in ref.module_set.masks.items():
            np.testing.assert_array_equal(np.asarray(r["masks"][k]), v.astype(int))
        np.testing.assert_allclose(np.asarray(r["scores"]), ref_scores, atol=1e-5)
    assert resumed[1][1]["writes"] == []
    w0 = resumed[0][1]["writes"]
    assert any("modules/modules.json" in w for w in w0) and any("search/search.json" in w for w in w0), w0
    saved = cs.load_module_set(tmp_path / "modules")  # the one copy process 0 wrote is whole
    for k, v in ref.module_set.masks.items():
        np.testing.assert_array_equal(saved.masks[k], v)
