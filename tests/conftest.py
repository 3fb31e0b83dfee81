"""Shared fixtures: trained runs and module sets built once per session with the library's
pipeline (only tests under tests/cli/ go through ``main([...])``)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# One persistent compilation cache for the session and the processes it starts (the 8-device
# and two-process runs, the CLI): a computation compiled by one test is not compiled again by
# another. Results are the same; only compile time is saved.
# Off by default: two CI runs of 2026-12-03 segfaulted inside JAX 0.10.2's CPU cache write
# (compilation_cache.put_executable_and_time); CNNSPLIT_TEST_COMPILE_CACHE=1 turns it back on.
if os.environ.get("CNNSPLIT_TEST_COMPILE_CACHE") == "1" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="cnnsplit-jax-test-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """After each test module, drop JAX's compiled executables and tracing caches. Three CI runs
    of the whole suite in one process (2026-12-03, JAX 0.10.2 on CPU) segfaulted inside XLA
    after ~80% of it, twice in the compilation-cache write and once in the compile itself, each
    time in a test that passes alone; what a module compiled is rarely reused by the next."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian dataset-fashion-mnist not installed")


@pytest.fixture(scope="session")
def digits():
    from cnnsplit_jax.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A narrow SimCNN trained on digits with the 'quick' recipe (the demo's), as a run directory."""
    from cnnsplit_jax.pipeline import train_run
    from cnnsplit_jax.train import RECIPES, TrainConfig

    out = tmp_path_factory.mktemp("digits_run") / "run"
    train_run(out, "simcnn", "digits", TrainConfig(**RECIPES["quick"], seed=0), width=0.125, recipe="quick")
    return out


@pytest.fixture(scope="session")
def digits_modules(digits_run, tmp_path_factory):
    """GradSplitter modules of ``digits_run`` (a short schedule), as a module-set directory."""
    from cnnsplit_jax.pipeline import split_run
    from cnnsplit_jax.splitters import GradSplitterConfig

    out = tmp_path_factory.mktemp("digits_modules") / "mods"
    split_run(digits_run, out, "grad", GradSplitterConfig(head_epochs=1, modularity_epochs=7, lr_modularity=0.05,
                                                          select_tolerance=0.03))
    return out


@pytest.fixture(scope="session")
def rescnn_modules(tmp_path_factory):
    """A second, weaker model of another architecture on digits (Dirichlet subsample), split."""
    from cnnsplit_jax.pipeline import split_run, train_run
    from cnnsplit_jax.splitters import GradSplitterConfig
    from cnnsplit_jax.train import TrainConfig

    d = tmp_path_factory.mktemp("rescnn")
    train_run(d / "run", "rescnn", "digits", TrainConfig(epochs=10, batch_size=64, lr=0.05, lr_milestones=(0.75,),
                                                         dirichlet_alpha=1.0, dirichlet_min_size=20, seed=1),
              width=0.125)
    split_run(d / "run", d / "mods", "grad", GradSplitterConfig(head_epochs=1, modularity_epochs=7, lr_modularity=0.05))
    return d / "mods"


@pytest.fixture(scope="session")
def resnet_digits(tmp_path_factory):
    """A narrow ResNet-20 trained on digits (the resnet recipe: Adam)."""
    from cnnsplit_jax.pipeline import train_run
    from cnnsplit_jax.train import RECIPES, TrainConfig

    out = tmp_path_factory.mktemp("resnet_digits") / "run"
    train_run(out, "resnet20", "digits", TrainConfig(**{**RECIPES["resnet"], "epochs": 20, "batch_size": 64}),
              width=0.5, recipe="resnet")
    return out


@pytest.fixture(scope="session")
def concern_modules(resnet_digits, tmp_path_factory):
    """Concern-identification module sets of ``resnet_digits``: {"none": dir, "bln": dir}:
    CI+TI+MC with the exact ``sum`` mapping, and the defaults (MC-BLN, the paper's mapping)."""
    from cnnsplit_jax.pipeline import split_run
    from cnnsplit_jax.splitters import ConcernConfig

    d = tmp_path_factory.mktemp("concern")
    for bt, cfg in (("none", ConcernConfig(backtrack="none", residual="sum")), ("bln", ConcernConfig())):
        split_run(resnet_digits, d / bt, "concern", cfg)
    return {"none": d / "none", "bln": d / "bln"}


#: top-level module names the authors' repositories use (purged around each oracle import)
_THEIR_PACKAGES = ("models", "utils", "splitters", "global_configure", "configures", "experiments", "ga",
                   "module_recorder", "module_explorer", "preprocess")


class ReferenceCheckout:
    """A checkout of the authors' repository, named by an environment variable; nothing of it is
    copied here. ``load(relpath, name)`` executes ``src/relpath`` as module ``name`` with
    ``src`` first on ``sys.path`` (their own imports resolve inside the checkout)."""

    def __init__(self, src: Path):
        self.src = src

    def load(self, relpath: str, name: str | None = None, stubs: dict | None = None):
        """``stubs``: ``{module name: {attribute: value}}`` put in ``sys.modules`` first, for
        their imports that need what is not installed here (torchvision, their data files)."""
        import importlib.util
        import sys
        import types

        for mod in list(sys.modules):
            if mod.split(".")[0] in _THEIR_PACKAGES:
                del sys.modules[mod]
        for mod, attrs in (stubs or {}).items():
            sys.modules[mod] = types.ModuleType(mod)
            sys.modules[mod].__dict__.update(attrs)
        sys.path.insert(0, str(self.src))
        try:
            spec = importlib.util.spec_from_file_location(name or Path(relpath).stem, self.src / relpath)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # as an import does: their code may look itself up
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(str(self.src))


def _reference(env: str, marker: str) -> ReferenceCheckout:
    path = os.environ.get(env)
    if not path:
        pytest.skip(f"{env} is not set: point it at a checkout of the authors' repository to run this oracle")
    src = Path(path) / "src"
    if not (src / marker).is_file():
        pytest.fail(f"{env}={path} is not a checkout of the authors' repository ({src / marker} is missing)")
    return ReferenceCheckout(src)


@pytest.fixture
def reference_gradsplitter() -> ReferenceCheckout:
    """The authors' GradSplitter (``CNNSPLIT_REFERENCE_GRADSPLITTER=/path/to/GradSplitter``)."""
    return _reference("CNNSPLIT_REFERENCE_GRADSPLITTER", "splitters/simcnn_splitter.py")


@pytest.fixture
def reference_mwt() -> ReferenceCheckout:
    """The authors' MwT (``CNNSPLIT_REFERENCE_MWT=/path/to/MwT``)."""
    return _reference("CNNSPLIT_REFERENCE_MWT", "models/utils_v2.py")


@pytest.fixture
def reference_cnnsplitter() -> ReferenceCheckout:
    """The authors' CNNSplitter (``CNNSPLIT_REFERENCE_CNNSPLITTER=/path/to/CNNSplitter``)."""
    return _reference("CNNSPLIT_REFERENCE_CNNSPLITTER", "module_recorder.py")
