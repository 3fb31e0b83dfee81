import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnsplit_jax.checkpoint import CheckpointError, load_model, load_tree, save_model, save_tree
from cnnsplit_jax.cli import main
from cnnsplit_jax.data import Dataset
from cnnsplit_jax.models import build_model
from cnnsplit_jax.train import TrainConfig, accuracy, augment, fit, make_optimizer

# a recipe that fits a narrow SimCNN on digits in ~10 s on 2 cores
FAST = TrainConfig(epochs=12, batch_size=64, lr=0.05, lr_milestones=(0.75,), seed=0)


def _narrow(arch="simcnn", classes=10, key=0):
    return build_model(arch, num_classes=classes, in_channels=1, width=0.125, key=key)


@pytest.fixture(scope="module")
def trained(digits):
    return fit(_narrow(), digits, FAST)


def test_narrow_simcnn_learns_digits(trained, digits):
    acc = accuracy(trained.model, digits.x_test, digits.y_test, digits.info)
    assert acc >= 0.90, acc
    assert trained.best_val_accuracy >= 0.90
    assert len(trained.history) == FAST.epochs
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"] / 3


def test_checkpoint_roundtrip_identical_outputs(trained, digits, tmp_path):
    save_model(tmp_path, trained.model, {"dataset": "digits", "test_accuracy": 0.5})
    model, meta = load_model(tmp_path)
    assert meta["arch"] == "simcnn" and meta["num_classes"] == 10 and meta["dataset"] == "digits"
    x = jnp.asarray(digits.x_test[:16], jnp.float32) / 255.0
    np.testing.assert_array_equal(model(x), trained.model(x))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(trained.model))):
        np.testing.assert_array_equal(a, b)


def _subset(ds, n):
    return Dataset(ds.x_train[:n], ds.y_train[:n], ds.x_test[:64], ds.y_test[:64], ds.info)


class Stop(Exception):
    pass


def test_resume_is_bit_identical(digits, tmp_path):
    ds = _subset(digits, 400)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=5)
    full = fit(_narrow(), ds, cfg)

    def crash(epoch, rec):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(_narrow(), ds, cfg, run_dir=tmp_path, on_epoch=crash)
    assert json.loads((tmp_path / "train_state.json").read_text())["epoch"] == 1
    resumed = fit(_narrow(), ds, cfg, run_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.model)), jax.tree.leaves(nnx.state(full.model))):
        np.testing.assert_array_equal(a, b)
    assert resumed.best_epoch == full.best_epoch
    # resuming under another config is refused rather than silently mixing runs
    with pytest.raises(CheckpointError, match="cannot resume"):
        fit(_narrow(), ds, TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=5), run_dir=tmp_path, resume=True)


def test_missing_and_corrupt_checkpoints(trained, tmp_path):
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        load_model(tmp_path / "nothing")
    save_model(tmp_path, trained.model)
    meta = tmp_path / "model" / "state" / "_METADATA"
    assert meta.is_file()
    meta.write_text("{ not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{{{")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        load_model(tmp_path)


def test_tree_checkpoint_shape_mismatch_and_keys(tmp_path):
    tree = {"a": jnp.arange(3.0), "k": jax.random.key(7), "n": (jnp.int32(4),)}
    save_tree(tmp_path / "t", tree)
    back = load_tree(tmp_path / "t", tree)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert jnp.array_equal(jax.random.key_data(back["k"]), jax.random.key_data(tree["k"]))
    assert int(back["n"][0]) == 4
    with pytest.raises(CheckpointError, match="shape"):
        load_tree(tmp_path / "t", {"a": jnp.arange(4.0), "k": tree["k"], "n": tree["n"]})
    with pytest.raises(CheckpointError, match="2 arrays|has 3 arrays"):
        load_tree(tmp_path / "t", {"a": tree["a"], "k": tree["k"]})
    # a second save replaces the first atomically (no .tmp / .old left behind)
    save_tree(tmp_path / "t", {**tree, "a": jnp.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_class_and_channel_mismatch(digits):
    with pytest.raises(ValueError, match="class count mismatch: model has 5 classes.*has 10"):
        fit(_narrow(classes=5), digits, FAST)
    rgb = build_model("simcnn", num_classes=10, in_channels=3, width=0.125)
    with pytest.raises(ValueError, match="channel mismatch"):
        fit(rgb, digits, FAST)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        accuracy(_narrow(classes=5), digits.x_test, digits.y_test, digits.info)


def test_optimizer_matches_torch_sgd_rule():
    # torch SGD: d = g + wd*p ; buf = m*buf + d ; p -= lr*buf ; lr drops x0.1 at the milestones
    cfg = TrainConfig(epochs=10, lr=0.1, momentum=0.9, weight_decay=0.01, lr_milestones=(0.2,))
    tx = make_optimizer(cfg, steps_per_epoch=1)
    p = jnp.array([1.0, -2.0])
    st = tx.init(p)
    buf, q = np.zeros(2), np.array([1.0, -2.0])
    for t in range(4):
        g = jnp.array([0.5, 0.25]) * (t + 1)
        u, st = tx.update(g, st, p)
        p = p + u
        d = np.asarray(g) + 0.01 * q
        buf = 0.9 * buf + d
        q = q - (0.1 if t < 2 else 0.01) * buf
    np.testing.assert_allclose(p, q, rtol=1e-6)


def test_augment_flip_and_crop():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1) + 1
    y = augment(jax.random.key(0), x, pad=0)  # no padding: only flips are possible
    for i in range(2):
        assert jnp.array_equal(y[i], x[i]) or jnp.array_equal(y[i], x[i, :, ::-1])
    z = augment(jax.random.key(1), x, pad=2)
    assert z.shape == x.shape
    # every crop keeps a 4x4 window of the original (values >0) and zero padding elsewhere
    assert all(int((z[i] > 0).sum()) >= 16 for i in range(2))


def test_cli_train_and_info(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "rescnn", "--dataset", "digits", "--width", "0.0625",
            "--epochs", "1", "--batch-size", "128", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "train.json").read_text())
    for k in ("model", "dataset", "width", "num_classes", "num_kernels", "num_params",
              "test_accuracy", "train_seconds"):
        assert k in res
    assert res["model"] == "rescnn" and res["num_classes"] == 10 and res["num_kernels"] == 268
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["train_seconds"] > 0
    model, meta = load_model(out)
    assert meta["normalization"]["mean"] == res["normalization"]["mean"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rescnn" in text and "268" in text and "conv_1[8]x2" in text
    # a second run into the same directory without --resume is refused
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert main(["train", "--model", "simcnn", "--dataset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    shutil.rmtree(out)
