"""These tests need 8 devices: ``tests/test_mesh.py`` runs them in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (8 simulated CPU devices), so the rest
of the suite keeps one device. Collected in the main run, they skip."""

from pathlib import Path

import jax
import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(reason="needs 8 devices: run through tests/test_mesh.py (a subprocess with 8 "
                                   "simulated CPU devices)")
    for item in items:  # this hook sees the whole session's items: mark only this directory's
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(skip)
