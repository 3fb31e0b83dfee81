import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def digits():
    from cnnsplit_jax.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A narrow SimCNN trained on digits by the CLI (the demo's recipe), as a run directory."""
    from cnnsplit_jax.cli import main

    out = tmp_path_factory.mktemp("digits_run") / "run"
    rc = main(["train", "--model", "simcnn", "--dataset", "digits", "--width", "0.125",
               "--epochs", "12", "--batch-size", "64", "--lr", "0.05", "--lr-milestones", "0.75",
               "--seed", "0", "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def digits_modules(digits_run, tmp_path_factory):
    """GradSplitter modules of ``digits_run``, split by the CLI (a short schedule)."""
    from cnnsplit_jax.cli import main

    out = tmp_path_factory.mktemp("digits_modules") / "mods"
    rc = main(["split", "--method", "grad", "--model-dir", str(digits_run), "--out", str(out),
               "--head-epochs", "1", "--modularity-epochs", "7", "--lr-modularity", "0.05",
               "--select-tolerance", "0.03"])
    assert rc == 0
    return out
