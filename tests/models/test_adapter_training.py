"""Training an adapted Linen CNN with BatchNorm and Dropout here: ``adapt(..., train_kwargs=)``.
The oracle is Flax itself: the user's module applied with the same arguments, ``mutable=
["batch_stats"]`` and the same dropout key, without our interception."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import cnnsplit_jax as cs
from cnnsplit_jax.models import AdapterError


class LinenBNDrop(nn.Module):
    """Conv-BN-ReLU twice, dropout, dense: the usual Linen CNN with a ``train`` flag."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(nn.Conv(4, (3, 3))(x)))
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(nn.Conv(6, (3, 3))(h)))
        h = nn.Dropout(0.3, deterministic=not train)(h.mean((1, 2)))
        return nn.Dense(4)(h)


def _adapted():
    m = LinenBNDrop()
    v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    model = cs.adapt(m, v, input_shape=(8, 8, 3), apply_kwargs={"train": False}, train_kwargs={"train": True},
                     definition="test_adapter_training:LinenBNDrop")
    return m, v, model


def _brightness_classes(seed: int):
    """Four classes of 8x8x3 images told apart by their brightness (384 train, 128 test)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 512)
    imgs = np.clip(rng.normal(60 + 40 * y[:, None, None, None], 30, (512, 8, 8, 3)), 0, 255).astype(np.uint8)
    info = cs.DatasetInfo("bars", ("a", "b", "c", "d"), 3, (0.5,) * 3, (0.25,) * 3)
    return cs.Dataset(imgs[:384], y[:384].astype(np.int32), imgs[384:], y[384:].astype(np.int32), info), imgs


def test_the_training_forward_equals_flax_s_and_writes_the_running_statistics_back():
    m, v, model = _adapted()
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3)) * 2 + 0.5
    k = jax.random.key(5)
    want, upd = m.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})
    np.testing.assert_allclose(model(x, train=True, dropout_key=k), want, rtol=1e-5, atol=1e-5)
    ours = model.linen_variables()["batch_stats"]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(upd["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(ours["BatchNorm_0"]["mean"])).max() > 1e-2  # moved from the init's zeros
    # inference afterwards reads the new averages, as Flax's eval forward with them
    np.testing.assert_allclose(model(x), m.apply({**v, **upd}, x, train=False), rtol=1e-5, atol=1e-5)
    # a mask in training lies after the BatchNorm: the same logits as the kernel, its bias and the
    # BatchNorm's scale and bias zeroed (the channel's batch statistics then give exactly its bias, 0)
    state = model.linen_variables()
    drop = jax.tree.map(jnp.asarray, state)
    p = drop["params"]
    for layer, leaf in (("Conv_1", "kernel"), ("Conv_1", "bias"), ("BatchNorm_1", "scale"), ("BatchNorm_1", "bias")):
        p[layer][leaf] = p[layer][leaf].at[..., jnp.array([2, 4])].set(0.0)
    masks = {"Conv_0": jnp.ones(4), "Conv_1": jnp.ones(6).at[jnp.array([2, 4])].set(0.0)}
    want, _ = m.apply(drop, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})
    np.testing.assert_allclose(model(x, masks, train=True, dropout_key=k), want, rtol=1e-5, atol=1e-5)
    # a dropout without a key is refused with what to pass
    with pytest.raises(ValueError, match="runs a Dropout, which needs a key"):
        model(x, train=True, dropout=False)


def test_mwt_trains_an_adapted_linen_cnn_with_batchnorm_and_it_is_saved_with_its_train_kwargs(tmp_path):
    _, _, model = _adapted()
    ds, imgs = _brightness_classes(0)
    before = np.asarray(model.linen_variables()["batch_stats"]["BatchNorm_1"]["var"]).copy()
    from cnnsplit_jax.train import RECIPES

    cfg = cs.TrainConfig(**{**RECIPES["mwt-quick"], "epochs": 6, "batch_size": 32, "augment": False})
    res = cs.fit(model, ds, cfg, objective=cs.MwTObjective())
    assert set(res.extra) == {"Conv_1"} and np.isfinite(res.history[-1]["train_coupling"])
    after = res.model.linen_variables()["batch_stats"]["BatchNorm_1"]["var"]
    assert not np.allclose(after, before)
    assert res.best_val_accuracy > 0.9  # four brightness classes, chance 0.25 (0.36 after the first epoch)
    cs.save_model(tmp_path / "run", res.model)
    back, _ = cs.load_model(tmp_path / "run", trust_definition=True)
    assert back.spec()["train_kwargs"] == {"train": True}
    x = jnp.asarray((imgs[:8] / 255.0 - 0.5) / 0.25, jnp.float32)
    np.testing.assert_allclose(back(x), res.model(x), rtol=1e-5, atol=1e-5)
    k = jax.random.key(2)
    np.testing.assert_allclose(back(x, train=True, dropout_key=k), res.model(x, train=True, dropout_key=k),
                               rtol=1e-5, atol=1e-5)


class _NNXChain(nnx.Module):
    def __init__(self, rngs):
        self.c = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.d = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.d(nnx.relu(self.c(x)).mean((1, 2)))


def test_train_kwargs_that_would_not_train_are_refused():
    m = LinenBNDrop()
    v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(AdapterError, match="leave the BatchNorm running statistics unchanged"):
        cs.adapt(m, v, input_shape=(8, 8, 3), apply_kwargs={"train": False}, train_kwargs={"train": False})
    with pytest.raises(AdapterError, match="the training forward with train_kwargs=.* fails"):
        cs.adapt(m, v, input_shape=(8, 8, 3), apply_kwargs={"train": False}, train_kwargs={"training": True})
    with pytest.raises(AdapterError, match="an NNX model trains by switching"):
        cs.adapt(_NNXChain(nnx.Rngs(0)), input_shape=(8, 8, 3), train_kwargs={"train": True})
    with pytest.raises(ValueError, match="adapt it with train_kwargs"):
        cs.adapt(m, v, input_shape=(8, 8, 3), apply_kwargs={"train": False})(jnp.zeros((2, 8, 8, 3)), train=True)


def test_sub_task_reuse_fine_tunes_an_adapted_model_under_its_fixed_union_mask(tmp_path):
    """MwT's sub-task reuse on a user's Linen model: the union of the classes' masks is fixed on
    a copy of the model (its graph is traced, so it is not extracted before training); the
    masked kernels get no gradient, so they end as they began, while the kept ones train; the
    trained module equals its physical extraction (``extract_adapted``, which slices the
    weights and runs its own convs); it is saved and loaded with its mask, and a damaged mask
    or an untrusted definition is refused."""
    from cnnsplit_jax.checkpoint import CheckpointError, UntrustedDefinitionError
    from cnnsplit_jax.modules import ModuleSet
    from cnnsplit_jax.modules.extract_adapted import extract_adapted
    from cnnsplit_jax.splitters import mwt

    _, _, model = _adapted()
    ds, imgs = _brightness_classes(1)
    info = ds.info
    masks = {"Conv_0": np.ones((4, 4), np.float32), "Conv_1": np.zeros((4, 6), np.float32)}
    masks["Conv_1"][0, [0, 1]] = masks["Conv_1"][2, [1, 3]] = masks["Conv_1"][1, [5]] = 1.0  # union of 0, 2: 0, 1, 3
    ms = ModuleSet(model, masks, None, {"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    before = jax.tree.map(np.asarray, model.linen_variables())
    cfg = cs.TrainConfig(**{**mwt.SUBTASK_RECIPE, "epochs": 3, "batch_size": 32, "augment": False})
    r = mwt.fine_tune_subtask(ms, ds, [0, 2], cfg)
    sub = r.fit.model
    assert isinstance(sub, mwt.MaskedSubtaskModule)
    np.testing.assert_array_equal(sub.masks["Conv_1"], [1, 1, 0, 1, 0, 0])
    assert r.kernel_retention == pytest.approx((4 + 3) / 10)
    after = sub.base.linen_variables()["params"]
    for layer, leaf in (("Conv_1", "kernel"), ("Conv_1", "bias"), ("BatchNorm_1", "scale"), ("BatchNorm_1", "bias")):
        old, new = before["params"][layer][leaf], np.asarray(after[layer][leaf])
        np.testing.assert_array_equal(new[..., [2, 4, 5]], old[..., [2, 4, 5]])  # masked: no gradient
        assert not np.allclose(new[..., [0, 1, 3]], old[..., [0, 1, 3]])  # kept: trained
    for a, b in zip(jax.tree.leaves(model.linen_variables()), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)  # the module set's model is not touched
    assert 0.0 <= r.test_accuracy <= 1.0 and r.fit.best_val_accuracy > 0.6  # two classes, chance 0.5
    x = jnp.asarray((imgs[:8] / 255.0 - 0.5) / 0.25, jnp.float32)
    small = extract_adapted(sub.base, sub.masks)
    np.testing.assert_allclose(small(x), sub(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="runs under its own fixed mask"):
        sub(x, {"Conv_1": jnp.ones(6)})
    mwt.save_subtask(tmp_path / "sub", r, {"dataset": "bars"})
    with pytest.raises(UntrustedDefinitionError):
        mwt.load_subtask(tmp_path / "sub")
    back, head, _ = mwt.load_subtask(tmp_path / "sub", trust_definition=True)
    np.testing.assert_array_equal(back.masks["Conv_1"], sub.masks["Conv_1"])
    np.testing.assert_allclose(mwt.subtask_logits(back, head, imgs[:8], info),
                               mwt.subtask_logits(sub, r.fit.extra, imgs[:8], info), rtol=1e-5, atol=1e-5)
    import json

    meta_path = tmp_path / "sub" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["subtask"]["masks"]["Conv_1"] = [1, 1, 0, 1, 0]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="fixed mask is not one of 0/1 per kernel"):
        mwt.load_subtask(tmp_path / "sub", trust_definition=True)
