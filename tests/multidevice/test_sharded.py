"""1 device against 8 (simulated CPU devices): every sharded entry point gives the single-device
result, for module counts that divide 8 and that do not, and its arrays really are split.
Run by ``tests/test_mesh.py`` in a subprocess (see conftest)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import cnnsplit_jax as cs
from cnnsplit_jax import mesh as M
from cnnsplit_jax.modules.forward import masked_logits
from cnnsplit_jax.splitters import gradsplitter as gs
from cnnsplit_jax.splitters.cnnsplitter import module_logits
from cnnsplit_jax.train import RECIPES



def one(axis: str = "modules"):
    """A mesh of one device: the entry points then run their unsharded code (what a
    single-device host runs). ``mesh=None`` would put all 8 devices on the natural axis."""
    return M.make_mesh(f"{axis}=1", devices=jax.devices()[:1])


def _model(n):
    return cs.build_model("simcnn", num_classes=n, in_channels=1, width=0.0625, key=0)


@pytest.fixture(scope="module")
def digits():
    ds = cs.load_dataset("digits")
    return ds


# N=10 on modules=8 (padded to 16) runs in the whole-search test below
@pytest.mark.parametrize("spec,n", [("modules=8", 8), ("data=2,modules=4", 10)])
def test_gradsplitter_steps_equal_one_device_and_are_split(n, spec):
    model, cfg = _model(n), cs.GradSplitterConfig(init="random")
    st = gs.init(jax.random.key(0), model, cfg)
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 1))
    y = jnp.arange(16) % n
    mesh = M.make_mesh(spec)
    s1, s8 = st, gs.place(st, mesh)
    n_pad = M.padded(n, mesh)
    assert s8.masks[next(iter(s8.masks))].shape[0] == n_pad == {("modules=8", 8): 8, ("data=2,modules=4", 10): 12}[(spec, n)]
    for _ in range(3):
        s1, m1 = gs.modularity_step(model, cfg, s1, x, y)
        s8, m8 = gs.modularity_step(model, cfg, s8, x, y, mesh=mesh, n_real=n)
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-5)
    for k, v in s8.masks.items():
        assert v.sharding.spec == P("modules") and v.sharding.mesh.shape == mesh.shape
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == n_pad // M.axis_size(mesh, "modules")
        np.testing.assert_allclose(np.asarray(v)[:n], np.asarray(s1.masks[k]), atol=1e-5)
        # the padding never moved (zero gradients): still copies of module 0's initial mask
        np.testing.assert_array_equal(np.asarray(v)[n:], np.repeat(np.asarray(st.masks[k])[:1], n_pad - n, 0))
    assert s8.heads.w1.sharding.spec == P("modules")
    np.testing.assert_allclose(np.asarray(s8.heads.w1)[:n], np.asarray(s1.heads.w1), atol=1e-5)
    mu = s8.opt_state.inner_state[0].mu["masks"]  # Adam's moments follow the masks
    assert next(iter(mu.values())).sharding.spec == P("modules")


def test_gradsplitter_steps_on_a_data_only_mesh():
    # what `cnnsplit demo --mesh data=8` gives the search: the batch split, every module on each device
    n, model, cfg = 10, _model(10), cs.GradSplitterConfig(init="random")
    st = gs.init(jax.random.key(0), model, cfg)
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 1))
    y = jnp.arange(16) % n
    mesh = M.make_mesh("data=8")
    s1, s8 = st, gs.place(st, mesh)
    for _ in range(2):
        s1, m1 = gs.modularity_step(model, cfg, s1, x, y)
        s8, m8 = gs.modularity_step(model, cfg, s8, x, y, mesh=mesh, n_real=n)
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-5)
    for k, v in s8.masks.items():
        assert v.shape[0] == n and v.sharding.spec == P() and len(v.sharding.device_set) == 8  # replicated
        np.testing.assert_allclose(np.asarray(v), np.asarray(s1.masks[k]), atol=1e-5)


def test_remat_groups_stay_inside_devices():
    n, model = 10, _model(10)
    cfg = cs.GradSplitterConfig(init="random")
    st = gs.init(jax.random.key(0), model, cfg)
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 1))
    y = jnp.arange(8) % n
    mesh = M.make_mesh("modules=8")
    s1, m1 = gs.modularity_step(model, cfg, st, x, y)
    cfg_r = cs.GradSplitterConfig(init="random", remat=True)
    s8, m8 = gs.modularity_step(model, cfg_r, gs.place(st, mesh), x, y, mesh=mesh, n_real=n)
    assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-5)
    for k in s1.masks:
        np.testing.assert_allclose(np.asarray(s8.masks[k])[:n], np.asarray(s1.masks[k]), atol=1e-5)
    # the block-wise lax.map returns modules in order: 16 modules, 8 devices, groups of 1
    masks = {k: jnp.arange(16.0)[:, None] * jnp.ones((16, 3)) for k in ("a",)}
    out = M.map_blocks(lambda t: t["a"] * 2, masks, 8, 1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(masks["a"]) * 2)


def test_gradsplitter_search_on_8_devices_matches_and_resumes_on_another_mesh(digits, tmp_path):
    ds = digits
    data = cs.SplitData(ds.x_train[:192], ds.y_train[:192], ds.x_train[192:320], ds.y_train[192:320],
                        ds.info.mean, ds.info.std)
    model = _model(10)
    cfg = cs.GradSplitterConfig(head_epochs=1, modularity_epochs=2, cycle_mod=1, cycle_head=1, batch_size=64,
                                lr_modularity=0.05)
    r1 = gs.split(jax.random.key(0), model, data, cfg, mesh=one())
    r8 = gs.split(jax.random.key(0), model, data, cfg, mesh="modules=8", ckpt_dir=tmp_path / "a")
    assert len(r8.history) == len(r1.history)
    for h1, h8 in zip(r1.history, r8.history):
        assert h8["loss"] == pytest.approx(h1["loss"], abs=1e-4)
        assert h8["val_accuracy"] == pytest.approx(h1["val_accuracy"], abs=1e-9)
        assert h8["mean_kernels"] == h1["mean_kernels"]
    for k, v in r1.module_set.masks.items():  # 10 real modules, padding gone
        assert r8.module_set.masks[k].shape == v.shape
        np.testing.assert_array_equal(r8.module_set.masks[k], v)
    # a search killed after epoch 1 on modules=8 resumes on data=2,modules=4 (checkpoints hold
    # the real modules) and ends where the uninterrupted one did
    def kill(p):
        if p.stage == "epoch" and p.index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gs.split(jax.random.key(0), model, data, cfg, mesh="modules=8", ckpt_dir=tmp_path / "b", callbacks=kill)
    r = gs.split(jax.random.key(0), model, data, cfg, mesh="data=2,modules=4", ckpt_dir=tmp_path / "b", resume=True)
    assert [h["epoch"] for h in r.history] == [h["epoch"] for h in r1.history]
    assert r.history[-1]["loss"] == pytest.approx(r1.history[-1]["loss"], abs=1e-4)
    for k, v in r1.module_set.masks.items():
        np.testing.assert_array_equal(r.module_set.masks[k], v)


@pytest.mark.parametrize("m", [40, 37])
def test_cnnsplitter_module_logits_split_over_devices(m):
    model = _model(10)
    rng = np.random.default_rng(m)
    masks = {p.name: jnp.asarray((rng.random((m, p.size)) < 0.6).astype(np.float32)) for p in cs.mask_points(model)}
    cls = np.arange(m) % 10
    x = jax.random.normal(jax.random.key(0), (12, 32, 32, 1))
    mesh = M.make_mesh("modules=8")
    a = module_logits(model, masks, cls, x, group=2)
    b = module_logits(model, masks, cls, x, group=2, mesh=mesh)
    assert b.shape == (m, 12)
    np.testing.assert_allclose(b, a, atol=1e-6)
    # the forward itself runs split: its [M, B, K] output lives in 8 blocks of modules
    to = M.padded(m, mesh)
    sharded = M.shard_rows(M.pad_rows(masks, to), mesh)
    out = jax.jit(lambda t: masked_logits(model, t, x, chunk=2, loop="map", shards=8))(sharded)
    assert out.sharding.spec[0] == "modules" and len({s.device for s in out.addressable_shards}) == 8


def test_cnnsplitter_search_on_8_devices_equals_one(digits):
    ds = digits
    data = cs.SplitData(ds.x_train[:64], ds.y_train[:64], ds.x_train[:96], ds.y_train[:96], ds.info.mean, ds.info.std)
    model = _model(10)
    cfg = cs.CNNSplitterConfig(population=6, generations=2, num_parents=4, keep_parents=2, eval_images=48,
                               module_group=3)  # 60 modules a generation: 64 padded, 8 a device
    from cnnsplit_jax.splitters import cnnsplitter

    r1 = cnnsplitter.split(jax.random.key(0), model, data, cfg, mesh=one(), sensitivity_ratios=(0.5, 1.0))
    r8 = cnnsplitter.split(jax.random.key(0), model, data, cfg, mesh="modules=8", sensitivity_ratios=(0.5, 1.0))
    key = lambda h: (h["generation"], h["best_fitness"], h["ensemble"], h["valid_accuracy"])  # noqa: E731
    assert [key(h) for h in r8.history] == [key(h) for h in r1.history]
    for k, v in r1.module_set.masks.items():
        np.testing.assert_array_equal(r8.module_set.masks[k], v)


def test_composition_splits_the_batch_and_equals_one_device():
    model = _model(10)
    rng = np.random.default_rng(0)
    masks = {p.name: (rng.random((10, p.size)) < 0.6).astype(np.float32) for p in cs.mask_points(model)}
    heads = cs.gradsplitter.init_heads(jax.random.key(0), 10, 10)
    ms = cs.ModuleSet(model, masks, heads, {"dataset": "synthetic", "normalization": {"mean": [0.5], "std": [0.25]}})
    picks = [cs.Pick(ms, c) for c in (0, 3, 7, 9)]
    single = cs.compose(picks, mesh=one("data"))
    eight = cs.compose(picks, mesh="data=8")
    assert single.mesh is None and dict(eight.mesh.shape) == {"data": 8}
    apply = jax.jit(cs.apply)
    for b in (16, 13):  # divides 8, does not (padded with copies, sliced off)
        x = jnp.asarray(rng.integers(0, 256, (b, 32, 32, 1)).astype(np.uint8))
        s1, s8 = apply(single, x), apply(eight, x)
        assert s8.shape == (b, 4)
        np.testing.assert_allclose(np.asarray(s8), np.asarray(s1), atol=1e-5)
        if b == 16:
            assert s8.sharding.spec == P("data") and len(s8.addressable_shards) == 8
    assert cs.predict_scores(eight, rng.integers(0, 256, (300, 32, 32, 1)).astype(np.uint8)).shape == (300, 4)
    # evaluation's module forward (cnnsplit evaluate --mesh): batches of 16 split over 8 devices
    from cnnsplit_jax.modules.forward import module_outputs

    xs = rng.integers(0, 256, (40, 32, 32, 1)).astype(np.uint8)  # 16, 16 and 8 padded to 16
    s1, p1 = module_outputs(ms, xs, batch_size=16)
    s8, p8 = module_outputs(ms, xs, batch_size=16, mesh=M.make_mesh("data=8"))
    assert s8.shape == (40, 10)
    np.testing.assert_allclose(s8, s1, atol=1e-5)
    np.testing.assert_array_equal(p8, p1)


def test_data_parallel_training_equals_one_device(digits):
    ds = digits
    ds = cs.Dataset(ds.x_train[:240], ds.y_train[:240], ds.x_test[:64], ds.y_test[:64], ds.info)
    model = _model(10)
    cfg = cs.TrainConfig(epochs=1, batch_size=64, lr=0.05, dropout=0.0)
    r1 = cs.fit(model, ds, cfg, mesh=one("data"))
    r8 = cs.fit(model, ds, cfg, mesh="data=8")
    assert r8.history[0]["train_loss"] == pytest.approx(r1.history[0]["train_loss"], abs=1e-4)
    from flax import nnx

    p1, p8 = nnx.state(r1.model, nnx.Param), nnx.state(r8.model, nnx.Param)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), p1, p8))
    assert max(diffs) < 2e-3  # 3 SGD steps at lr 0.05 (BatchNorm, batch 64 = 8 x 8): the all-reduce sums in another order
    leaf = jax.tree.leaves(p8)[0]
    assert leaf.sharding.mesh.shape == {"data": 8} and leaf.sharding.spec == P()  # replicated parameters


def test_mwt_training_on_a_data_mesh_equals_one_device(digits):
    """MwT's pair losses span the whole batch: split over 8 devices, the step still sees every
    same- and different-label pair (the partitioner gathers the masks), so the run equals one
    device's."""
    ds = digits
    ds = cs.Dataset(ds.x_train[:240], ds.y_train[:240], ds.x_test[:64], ds.y_test[:64], ds.info)
    cfg = cs.TrainConfig(**{**RECIPES["mwt-quick"], "epochs": 1, "batch_size": 64, "dropout": False})
    r1 = cs.fit(_model(10), ds, cfg, mesh=one("data"), objective=cs.MwTObjective())
    r8 = cs.fit(_model(10), ds, cfg, mesh="data=8", objective=cs.MwTObjective())
    for k in ("train_loss", "train_cohesion", "train_coupling"):
        assert r8.history[0][k] == pytest.approx(r1.history[0][k], abs=1e-4), k
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         r1.extra, r8.extra))
    assert max(diffs) < 2e-3


def test_a_mesh_that_does_not_use_every_device_is_refused():
    with pytest.raises(M.MeshError, match="uses 4 of the 8 devices"):
        M.make_mesh("modules=4")
    with pytest.raises(M.MeshError, match="needs 16 devices; only 8 exist"):
        M.make_mesh("data=2,modules=8")
    assert dict(M.make_mesh(None).shape) == {"modules": 8}
    assert dict(M.make_mesh(None, natural="data").shape) == {"data": 8}


def test_concern_identification_splits_the_images_and_equals_one_device(digits, monkeypatch):
    import importlib

    D = importlib.import_module("cnnsplit_jax.splitters.concern.decompose")  # the module, not the function

    model = cs.build_model("resnet20", num_classes=10, in_channels=1, width=0.125, key=0)
    x, y = digits.x_train[:300], digits.y_train[:300]
    seen = []

    def spy(graphdef, state, xb, mem, names):
        seen.append(getattr(xb, "sharding", None))
        return orig(graphdef, state, xb, mem, names)

    orig = D._counts
    monkeypatch.setattr(D, "_counts", spy)
    # batch 32 divides data=8 (the last batch is padded to 32 rows of zero membership); with
    # batch 36 (not a multiple of 8) every batch runs whole on each device: same counts.
    for bs in (32, 36):
        cfg = cs.ConcernConfig(concerned_per_class=20, min_confidence=None, batch_size=bs)
        seen.clear()
        single = D.decompose(model, x, y, digits.info.mean, digits.info.std, cfg, mesh=one("data"))
        eight = D.decompose(model, x, y, digits.info.mean, digits.info.std, cfg, mesh="data=8")
        assert eight.stats["images_forwarded"] == single.stats["images_forwarded"] > 150
        for k, v in single.inactive.items():  # integer counts: bit-identical
            np.testing.assert_array_equal(eight.inactive[k], v)
            np.testing.assert_array_equal(eight.ci_inactive[k], single.ci_inactive[k])
        assert eight.stats["inactive"] == single.stats["inactive"] and sum(single.stats["ti_restored"]) > 0
        split = [s for s in seen if s is not None and getattr(s, "spec", None) == P("data")]
        assert (len(split) > 0) == (bs == 32) and all(len(s.device_set) == 8 for s in split)


def test_cli_split_with_a_mesh_runs_on_a_model_loaded_from_a_run_directory(digits, tmp_path):
    """`cnnsplit split --mesh modules=8` and `evaluate --mesh data=8` on a run directory (a
    restored checkpoint, whose arrays once came back committed to device 0 and clashed with
    the masks on 8 devices): the split.json of one device (the pipeline on a one-device mesh)
    within 0.02 kernel retention."""
    import json

    from cnnsplit_jax.checkpoint import load_model, save_model
    from cnnsplit_jax.cli import main
    from cnnsplit_jax.pipeline import run_data

    run = tmp_path / "run"
    save_model(run, _model(10), {"dataset": "digits", "class_names": list(digits.info.class_names),
                                 "normalization": {"mean": list(digits.info.mean), "std": list(digits.info.std)},
                                 "split": {"seed": 0, "val_fraction": 0.2}})
    flags = {"head_epochs": 1, "modularity_epochs": 7, "lr_modularity": 0.05, "init": "random"}
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    assert main(["split", "--method", "grad", "--model-dir", str(run), *cli, "--train-subset", "192",
                 "--out", str(tmp_path / "eight"), "--mesh", "modules=8"]) == 0
    eight = json.loads((tmp_path / "eight" / "split.json").read_text())
    # one device: the same search on the same data (what split_run reads), without its evaluation
    model, meta = load_model(run)
    rd = run_data(meta)
    tr = rd.train_idx[:192]
    data = cs.SplitData(rd.ds.x_train[tr], rd.ds.y_train[tr], rd.ds.x_train[rd.val_idx], rd.ds.y_train[rd.val_idx],
                        digits.info.mean, digits.info.std)
    single = gs.split(jax.random.key(0), model, data, cs.GradSplitterConfig(**flags), mesh=one())
    retention = single.module_set.structure(flops=False)["mean_kernel_retention"]
    assert retention < 0.9  # kernels were removed: the comparison is not vacuous
    assert abs(eight["mean_kernel_retention"] - retention) <= 0.02
    assert eight["selected_epoch"] == single.details["selected_epoch"]
    assert main(["evaluate", str(tmp_path / "eight"), "--mesh", "data=8"]) == 0
    ev = json.loads((tmp_path / "eight" / "evaluate.json").read_text())
    assert ev["composed_accuracy"] == pytest.approx(eight["composed_accuracy"], abs=1e-6)
