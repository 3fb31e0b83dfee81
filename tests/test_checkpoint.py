"""Checkpoints: models and pytrees round-trip exactly; damaged or mismatched checkpoints give
short, specific errors; resumable progress is saved as one atomic unit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnsplit_jax.checkpoint import (CheckpointError, config_json, load_model, load_progress, load_tree,
                                     progress_exists, save_model, save_progress, save_tree)
from cnnsplit_jax.train import TrainConfig


def test_checkpoint_roundtrip_identical_outputs(digits_run, digits, tmp_path):
    trained, _ = load_model(digits_run)
    save_model(tmp_path, trained, {"dataset": "digits", "test_accuracy": 0.5})
    model, meta = load_model(tmp_path)
    assert meta["arch"] == "simcnn" and meta["num_classes"] == 10 and meta["dataset"] == "digits"
    x = jnp.asarray(digits.x_test[:16], jnp.float32) / 255.0
    np.testing.assert_array_equal(model(x), trained(x))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(trained))):
        np.testing.assert_array_equal(a, b)


def test_missing_and_corrupt_checkpoints(digits_run, tmp_path):
    trained, _ = load_model(digits_run)
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        load_model(tmp_path / "nothing")
    save_model(tmp_path, trained)
    meta = tmp_path / "model" / "state" / "_METADATA"
    assert meta.is_file()
    meta.write_text("{ not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as e:
        load_model(tmp_path)
    assert len(str(e.value).splitlines()) == 1 and str(tmp_path / "model") in str(e.value)
    assert e.value.detail.startswith("JSONDecodeError: ")  # the full cause, kept apart from the message
    assert e.value.detail not in str(e.value)
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


def test_progress_is_saved_and_restored_as_one_unit(tmp_path):
    cfg = config_json(TrainConfig(epochs=3))
    assert cfg["lr_milestones"] == [0.3, 0.6] and json.loads(json.dumps(cfg)) == cfg
    tree = {"w": jnp.arange(4.0), "key": jax.random.key(1)}
    assert not progress_exists(tmp_path, "loop")
    save_progress(tmp_path, "loop", tree, {"epoch": 0, "config": cfg})
    save_progress(tmp_path, "loop", {**tree, "w": jnp.ones(4)}, {"epoch": 1, "config": cfg})
    assert progress_exists(tmp_path, "loop")
    back, prog = load_progress(tmp_path, "loop", tree, cfg)
    assert prog["epoch"] == 1 and np.array_equal(back["w"], np.ones(4))
    # the record inside the checkpoint wins over the readable copy next to it
    (tmp_path / "loop.json").write_text(json.dumps({"epoch": 7, "config": cfg}))
    assert load_progress(tmp_path, "loop", tree, cfg)[1]["epoch"] == 1
    # a growing tree: the template is a function of the progress record
    back, _ = load_progress(tmp_path, "loop", lambda p: {"w": jnp.zeros(4), "key": tree["key"]}, cfg)
    assert np.array_equal(back["w"], np.ones(4))
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_progress(tmp_path, "loop", tree, config_json(TrainConfig(epochs=4)))
    with pytest.raises(ValueError, match="config"):
        save_progress(tmp_path, "loop", tree, {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "loop.json"]
