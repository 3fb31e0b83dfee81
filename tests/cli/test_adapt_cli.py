"""A user's own Linen model through the command line: ``cnnsplit adapt`` from the user's
package and msgpack variables, then ``split``, ``evaluate`` and ``compose`` (masked and
extracted) on its run directory, and the module set loaded back with its definition.
Oracles: the accuracy the user computes with their own ``apply``; the masked composition
for the extracted one; the module set's masks as written."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import cnnsplit_jax as cs
from cnnsplit_jax.cli import main

USER_MODULE = '''
from flax import linen as nn


class SmallCNN(nn.Module):  # the Flax MNIST example's layout, narrow, at 28x28
    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def build():
    return SmallCNN()
'''


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """(package dir, msgpack path, the user's own test accuracy) of a model trained here."""
    root = tmp_path_factory.mktemp("user")
    (root / "userpkg").mkdir()
    (root / "userpkg" / "__init__.py").write_text("")
    (root / "userpkg" / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    ds = cs.load_dataset("digits")
    crop = lambda x: x[:, 2:30, 2:30]  # noqa: E731  (what --input-shape 28,28,1 takes)
    mean, std = ds.info.mean[0], ds.info.std[0]
    norm = lambda x: jnp.asarray((crop(x) / 255.0 - mean) / std, jnp.float32)  # noqa: E731
    import sys

    sys.path.insert(0, str(root))
    from userpkg.nets import SmallCNN

    m = SmallCNN()
    params = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, xb, yb):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(m.apply(p, xb), yb).mean())(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    x, y = norm(ds.x_train), jnp.asarray(ds.y_train)
    for epoch in range(5):
        order = np.random.default_rng(epoch).permutation(len(y))
        for i in range(0, len(y), 64):
            b = order[i:i + 64]
            params, opt = step(params, opt, x[b], y[b])
    acc = float((np.asarray(m.apply(params, norm(ds.x_test))).argmax(1) == ds.y_test).mean())
    path = root / "weights.msgpack"
    path.write_bytes(serialization.to_bytes(params))
    yield root, path, acc
    sys.path.remove(str(root))


def test_adapt_split_evaluate_compose_a_users_linen_model(user_model, tmp_path, capsys):
    root, weights, acc = user_model
    run, mods = tmp_path / "run", tmp_path / "mods"
    adapt = ["adapt", "--definition", "userpkg.nets:build", "--variables", str(weights), "--dataset", "digits",
             "--input-shape", "28,28,1", "--out", str(run)]
    assert main(adapt) == 0
    assert "Conv_0[8], Conv_1[16]" in capsys.readouterr().out
    res = json.loads((run / "adapt.json").read_text())
    assert res["test_accuracy"] == pytest.approx(acc, abs=1e-6) and acc > 0.9
    with pytest.raises(cs.UntrustedDefinitionError, match="userpkg.nets"):  # the user's code: only when asked
        cs.checkpoint.load_model(run)
    model, meta = cs.checkpoint.load_model(run, trust_definition=True)  # rebuilt from the definition and the variables
    assert model.arch == "adapted:SmallCNN" and meta["adapted"]["definition"] == "userpkg.nets:build"
    assert main(["split", "--method", "grad", "--model-dir", str(run), "--out", str(mods), "--head-epochs", "1",
                 "--modularity-epochs", "14", "--lr-modularity", "0.05", "--alpha", "0.5", "--train-subset", "600",
                 "--trust-definition"]) == 0
    split = json.loads((mods / "split.json").read_text())
    # measured: base 0.983 on the module-evaluation images, composed 0.962 at kernel retention 0.94
    assert split["model"] == "adapted:SmallCNN" and split["composed_accuracy"] > acc - 0.05
    assert split["mean_kernel_retention"] < 0.99  # kernels removed: extraction below slices for real
    ms = cs.load_module_set(mods, trust_definition="userpkg.nets:build")  # the definition named again
    written = cs.checkpoint.load_tree(mods / "modules", ms.tree())
    for k in ms.masks:
        np.testing.assert_array_equal(np.asarray(ms.masks[k]), written["masks"][k])
    st = ms.structure()
    assert 0 < min(st["module_flops_ratio"]) < 1.0 and max(st["module_flops_ratio"]) <= 1.0
    capsys.readouterr()
    assert main(["evaluate", str(mods), "--trust-definition"]) == 0
    ev = json.loads((mods / "evaluate.json").read_text())
    assert ev["composed_accuracy"] == pytest.approx(split["composed_accuracy"], abs=1e-9)
    for form in ("masked", "extracted"):
        assert main(["compose", "--modules", str(mods), "--form", form, "--out", str(tmp_path / form),
                     "--trust-definition"]) == 0
    masked, extracted = (json.loads((tmp_path / f / "compose.json").read_text()) for f in ("masked", "extracted"))
    assert masked["accuracy"] == pytest.approx(split["composed_accuracy"], abs=0.02)  # the final-test images
    assert extracted["accuracy"] == pytest.approx(masked["accuracy"], abs=2e-3)
    # MwT's sub-task reuse of two of its modules: a copy of the model under the union of their masks
    # (its graph is traced, not declared), fine-tuned with a new head on the 28x28 crops
    capsys.readouterr()
    assert main(["subtask", "--modules", str(mods), "--classes", "3,8", "--out", str(tmp_path / "sub"),
                 "--epochs", "2", "--trust-definition"]) == 0
    sub = json.loads((tmp_path / "sub" / "subtask.json").read_text())
    points = ms.base.mask_points()
    union = sum(float(np.maximum(*np.asarray(ms.masks[p.name])[[3, 8]]).sum()) * len(p.layers) for p in points)
    union /= sum(p.size * len(p.layers) for p in points)
    assert sub["kernel_retention"] == pytest.approx(union) and sub["test_accuracy"] > 0.9
    module, head, _ = cs.mwt.load_subtask(tmp_path / "sub", trust_definition=True)
    ds = cs.load_dataset("digits")
    keep = np.isin(ds.y_test, [3, 8])
    logits = cs.mwt.subtask_logits(module, head, ds.x_test[keep][:, 2:30, 2:30], ds.info)
    got = float((logits.argmax(1) == np.where(ds.y_test[keep] == 3, 0, 1)).mean())
    assert got == pytest.approx(sub["test_accuracy"], abs=1e-9)


def test_adapt_errors_name_the_problem(user_model, tmp_path, capsys):
    root, weights, _ = user_model
    base = ["adapt", "--dataset", "digits", "--input-shape", "28,28,1", "--out", str(tmp_path / "r")]
    assert main(base + ["--definition", "userpkg.nets:Nope", "--variables", str(weights)]) == 2
    assert "cannot import the model definition 'userpkg.nets:Nope'" in capsys.readouterr().err
    assert main(base + ["--definition", "userpkg.nets:build"]) == 2
    assert "Linen module: pass its trained variables" in capsys.readouterr().err
    assert main(base + ["--definition", "userpkg.nets:build", "--variables", str(tmp_path / "none.msgpack")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["adapt", "--dataset", "digits", "--input-shape", "36,36,1", "--out", str(tmp_path / "r2"),
                 "--definition", "userpkg.nets:build", "--variables", str(weights)]) == 2
    assert "other shapes than the model" in capsys.readouterr().err  # 36x36 needs a wider dense layer
    assert main(base + ["--definition", "userpkg.nets:build", "--variables", str(weights),
                        "--train-kwargs", '{"train": true}']) == 2  # SmallCNN's __call__ takes no train flag
    assert "the training forward with train_kwargs={'train': True} fails" in capsys.readouterr().err
    # a node model: the hints name --method concern, and an adapted run is replaced only on request
    node = ["adapt", "--definition", "userpkg.nets:build", "--variables", str(weights), "--dataset", "digits",
            "--input-shape", "28,28,1", "--kind", "node", "--out", str(tmp_path / "node")]
    assert main(node) == 0
    assert f"next: cnnsplit split --method concern --model-dir {tmp_path / 'node'}" in capsys.readouterr().err
    assert main(["split", "--model-dir", str(tmp_path / "node"), "--out", str(tmp_path / "s"), "--trust-definition"]) == 2
    assert ("adapted:SmallCNN, a model adapted with --kind node (position nodes): split it with --method concern"
            in capsys.readouterr().err)
    assert main(node) == 2
    assert "already holds an adapted model; pass --overwrite to replace it" in capsys.readouterr().err


def test_train_a_users_model_with_mwt_from_the_command_line(user_model, tmp_path, capsys):
    """``cnnsplit adapt`` then ``cnnsplit train --init-from RUN --method mwt``: the user's model
    trained modularly from its weights, on the run's dataset cropped to its input and with its
    normalisation, then split by MwT. Oracle: the user's own ``apply`` on the saved variables."""
    root, weights, _ = user_model
    run, out, mods = tmp_path / "run", tmp_path / "mwt", tmp_path / "mods"
    assert main(["adapt", "--definition", "userpkg.nets:build", "--variables", str(weights), "--dataset", "digits",
                 "--input-shape", "28,28,1", "--mean", "0.4", "--std", "0.3", "--out", str(run)]) == 0
    train = ["train", "--init-from", str(run), "--method", "mwt", "--epochs", "2", "--batch-size", "64",
             "--lr", "0.01", "--out", str(out)]
    capsys.readouterr()
    assert main(train) == 2  # the user's code runs only on request
    assert "--trust-definition" in capsys.readouterr().err
    assert main(train + ["--trust-definition"]) == 0
    res = json.loads((out / "train.json").read_text())
    assert res["model"] == "adapted:SmallCNN" and res["dataset"] == "digits" and res["config"]["init_from"] == str(run)
    assert res["normalization"] == {"mean": [0.4], "std": [0.3]}  # the adapted run's, not the dataset's
    model, meta = cs.checkpoint.load_model(out, trust_definition=True)
    assert meta["input_shape"] == [28, 28, 1] and "mwt" in meta
    # the model alone, by the user's own apply on the saved variables and the 28x28 crops
    from userpkg.nets import SmallCNN

    ds = cs.load_dataset("digits")
    x = jnp.asarray((ds.x_test[:, 2:30, 2:30] / 255.0 - 0.4) / 0.3, jnp.float32)
    alone = float((np.asarray(SmallCNN().apply(model.linen_variables(), x)).argmax(1) == ds.y_test).mean())
    assert res["test_accuracy_model_alone"] == pytest.approx(alone, abs=1e-9)
    start, _ = cs.checkpoint.load_model(run, trust_definition=True)  # trained from the run's weights, and moved
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         model.linen_variables()["params"], start.linen_variables()["params"])
    assert max(jax.tree.leaves(moved)) > 1e-4 and res["test_accuracy"] > 0.9  # 0.983 measured (0.983 at the start)
    assert main(["split", "--method", "mwt", "--model-dir", str(out), "--out", str(mods), "--trust-definition"]) == 0
    split = json.loads((mods / "split.json").read_text())
    assert split["model"] == "adapted:SmallCNN" and 0 < split["mean_kernel_retention"] <= 1
    # what --init-from cannot take, named
    capsys.readouterr()
    assert main(["train", "--init-from", str(out), "--out", str(tmp_path / "again"), "--trust-definition"]) == 2
    assert "was trained for MwT" in capsys.readouterr().err
    assert main(["train", "--init-from", str(run), "--dataset", "digits:0-4", "--out", str(tmp_path / "c"),
                 "--trust-definition"]) == 2
    assert "class count mismatch: model has 10 classes" in capsys.readouterr().err
    assert main(["train", "--init-from", str(run), "--width", "0.5", "--out", str(tmp_path / "w")]) == 2
    assert "--init-from trains the run's model as it is" in capsys.readouterr().err
    assert main(["train", "--model", "simcnn", "--out", str(tmp_path / "d")]) == 2
    assert "--model needs --dataset" in capsys.readouterr().err
