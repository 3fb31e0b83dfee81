"""Device meshes: spec parsing and its errors (one device, here), and the 8-device checks of
``tests/multidevice`` run in a subprocess with 8 simulated CPU devices."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from cnnsplit_jax import mesh as M
from cnnsplit_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_parse_and_make_mesh_and_their_errors():
    assert M.parse_mesh("data=2,modules=4") == {"data": 2, "modules": 4}
    assert M.parse_mesh(" modules = 8 ") == {"modules": 8}
    for bad, msg in [("modules", "expected AXIS=SIZE"), ("modules=x", "could not read"), ("=4", "expected AXIS=SIZE"),
                     ("modules=2,modules=4", "given twice")]:
        with pytest.raises(M.MeshError, match=msg):
            M.parse_mesh(bad)
    with pytest.raises(M.MeshError, match="unknown mesh axis 'batch'.*splits modules, data"):
        M.make_mesh("batch=1")
    with pytest.raises(M.MeshError, match="unknown mesh axis 'modules': this entry point splits data"):
        M.make_mesh("modules=1", natural="data", allowed=("data",))
    with pytest.raises(M.MeshError, match="sizes are at least 1"):
        M.make_mesh("modules=0")
    n = jax.device_count()
    with pytest.raises(M.MeshError, match=f"needs {4 * n} devices; only {n} exist"):
        M.make_mesh(f"modules={4 * n}")
    # one device: every entry point runs its unsharded code
    assert M.resolve(None) is None and M.resolve(f"modules={n}") is None if n == 1 else True
    assert M.padded(10, None) == 10 and M.axis_size(None, "modules") == 1


def test_cli_rejects_a_bad_mesh_before_any_work(tmp_path, capsys):
    rc = main(["train", "--model", "simcnn", "--dataset", "digits", "--out", str(tmp_path / "r"), "--mesh", "gpus=8"])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown mesh axis 'gpus'" in err and not (tmp_path / "r").exists()
    rc = main(["compose", "--modules", str(tmp_path / "none"), "--out", str(tmp_path / "c"), "--mesh", "modules=2"])
    assert rc != 0 and "unknown mesh axis 'modules': this entry point splits data" in capsys.readouterr().err
    rc = main(["split", "--method", "concern", "--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "s"),
               "--mesh", "modules=2"])  # concern identification splits its images, not modules
    assert rc != 0 and "unknown mesh axis 'modules': this entry point splits data" in capsys.readouterr().err
    rc = main(["demo", "--out", str(tmp_path / "d"), "--mesh", "modules=1"])
    assert rc != 0 and "unknown mesh axis 'modules': this entry point splits data" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    rc = main(["evaluate", str(tmp_path / "m"), "--mesh", "data=3"])
    assert rc != 0 and "mesh data=3 needs 3 devices; only 1 exist" in capsys.readouterr().err
    for cmd in (["patch", "--weak", str(tmp_path / "w"), "--modules", str(tmp_path / "m"), "--target-class", "0"],
                ["replace", "--modules", str(tmp_path / "m"), "--with", str(tmp_path / "m2"), "--class", "0"]):
        rc = main([*cmd, "--out", str(tmp_path / "p"), "--mesh", "data=3"])
        assert rc != 0 and "mesh data=3 needs 3 devices; only 1 exist" in capsys.readouterr().err, cmd
        assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_eight_simulated_devices_give_the_one_device_results():
    # Eigen's own threads off: 8 simulated devices on a few cores otherwise oversubscribe them (~8% slower)
    flags = " --xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + flags).strip(),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "multidevice")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], tail
    passed = int(out.stdout.splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed == 14, tail
