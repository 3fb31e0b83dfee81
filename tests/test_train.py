import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnsplit_jax.checkpoint import CheckpointError, load_model
from cnnsplit_jax.data import Dataset
from cnnsplit_jax.models import build_model
from cnnsplit_jax.train import RECIPES, TrainConfig, accuracy, augment, fit, make_optimizer, recipe_warnings

# the 'quick' recipe fits a narrow SimCNN on digits in ~10 s on 2 cores
FAST = TrainConfig(**RECIPES["quick"], seed=0)


def _narrow(arch="simcnn", classes=10, key=0):
    return build_model(arch, num_classes=classes, in_channels=1, width=0.125, key=key)


def test_narrow_simcnn_learns_digits(digits_run, digits):
    # the session's run (conftest: the quick recipe, trained by pipeline.train_run)
    model, meta = load_model(digits_run)
    res = json.loads((digits_run / "train.json").read_text())
    acc = accuracy(model, digits.x_test, digits.y_test, digits.info)
    assert acc >= 0.90 and acc == res["test_accuracy"] == meta["test_accuracy"]
    assert res["val_accuracy"] >= 0.90 and res["config"]["lr_milestones"] == [0.75]
    hist = res["history"]
    assert len(hist) == FAST.epochs == res["epochs"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] / 3
    assert res["val_accuracy"] == max(h["val_accuracy"] for h in hist)  # the best epoch is kept


def test_recipes_and_their_warnings():
    assert recipe_warnings(TrainConfig(epochs=10), "reference")  # 10 epochs of a 200-epoch schedule
    assert recipe_warnings(TrainConfig(), "reference") == []
    assert recipe_warnings(FAST, "quick") == []
    assert set(RECIPES) == {"reference", "weak", "poor-fit", "resnet", "quick", "mwt", "mwt-quick"}
    assert recipe_warnings(TrainConfig(**{**RECIPES["mwt"], "epochs": 12}), "mwt")  # MwT's 200-epoch cosine
    assert recipe_warnings(TrainConfig(**RECIPES["mwt-quick"]), "mwt-quick") == []
    with pytest.raises(ValueError, match="no milestones"):
        TrainConfig(lr_schedule="cosine")  # the default milestones would be silently ignored
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(optimizer="adam", nesterov=True)


def _subset(ds, n):
    return Dataset(ds.x_train[:n], ds.y_train[:n], ds.x_test[:64], ds.y_test[:64], ds.info)


class Stop(Exception):
    pass


def test_resume_is_bit_identical(digits, tmp_path):
    ds = _subset(digits, 400)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=5)
    full = fit(_narrow(), ds, cfg)

    def crash(p):
        if p.stage == "epoch" and p.index == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(_narrow(), ds, cfg, run_dir=tmp_path, callbacks=crash)
    assert json.loads((tmp_path / "train_state.json").read_text())["epoch"] == 1
    resumed = fit(_narrow(), ds, cfg, run_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.model)), jax.tree.leaves(nnx.state(full.model))):
        np.testing.assert_array_equal(a, b)
    assert resumed.best_epoch == full.best_epoch
    # resuming under another config is refused rather than silently mixing runs
    with pytest.raises(CheckpointError, match="cannot resume"):
        fit(_narrow(), ds, TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=5), run_dir=tmp_path, resume=True)


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


def test_augmented_validation_changes_only_the_validation_images(digits):
    """augment_val (the reference's epoch choice on augmented validation images): training is
    the same, the validation images of an epoch are a seeded flip + crop of the split, redrawn
    per epoch."""
    from cnnsplit_jax.train import validation_images

    ds = _subset(digits, 300)
    base = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=2, augment=False)
    aug = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=2, augment=False, augment_val=True)
    plain, shifted = fit(_narrow(), ds, base), fit(_narrow(), ds, aug)
    assert [h["train_loss"] for h in plain.history] == [h["train_loss"] for h in shifted.history]
    assert [h["val_accuracy"] for h in plain.history] != [h["val_accuracy"] for h in shifted.history]
    x = ds.x_train[:50]
    assert validation_images(x, base, 0) is x
    v0, v0b, v1 = validation_images(x, aug, 0), validation_images(x, aug, 0), validation_images(x, aug, 1)
    assert v0.dtype == np.uint8 and v0.shape == x.shape
    np.testing.assert_array_equal(v0, v0b)  # seeded by (seed, epoch): a resume sees the same images
    assert not np.array_equal(v0, v1) and not np.array_equal(v0, x)
    # every image is its original flipped or not, shifted by at most 4 pixels, zero-filled
    for a, b in zip(v0[:10], x[:10]):
        ok = any(np.array_equal(a, _shift(f, dy, dx)) for f in (b, b[:, ::-1]) for dy in range(-4, 5)
                 for dx in range(-4, 5))
        assert ok


def _shift(img, dy, dx):
    out = np.zeros_like(img)
    h, w = img.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_augment_flip_and_crop():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1) + 1
    y = augment(jax.random.key(0), x, pad=0)  # no padding: only flips are possible
    for i in range(2):
        assert jnp.array_equal(y[i], x[i]) or jnp.array_equal(y[i], x[i, :, ::-1])
    z = augment(jax.random.key(1), x, pad=2)
    assert z.shape == x.shape
    # every crop keeps a 4x4 window of the original (values >0) and zero padding elsewhere
    assert all(int((z[i] > 0).sum()) >= 16 for i in range(2))
