"""Concern identification (Pan & Rajan): CI / TI on hand-checkable inputs, the vectorised
counts against a per-class loop, channeling, MC-BLN, the voting rule, a narrow ResNet-20 on
digits through the CLI, and cross-model reuse with continuous learning."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax import concern as C
from cnnsplit_jax.data import normalize
from cnnsplit_jax.models import build_model


def _identity_stem(model):
    """conv_0 copies the image into its single channel (centre tap 1, bias 0)."""
    k = np.zeros(model.conv_0.kernel.shape, np.float32)
    k[1, 1, 0, 0] = 1.0
    model.conv_0.kernel[...] = jnp.asarray(k)
    model.conv_0.bias[...] = jnp.zeros_like(model.conv_0.bias[...])


def test_resnet_depths_and_nodes():
    for arch, blocks in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9)):
        m = build_model(arch, num_classes=10, in_channels=3, width=0.25)
        convs = [s for s in m.topology if not s.name.endswith("_short")]
        assert len(convs) + 1 == 6 * blocks + 2  # conv layers + the dense layer
        nodes = m.nodes()
        assert len(nodes) == 1 + 6 * blocks
        assert nodes[-1].shape == (8, 8, 16) and nodes[0].shape == (32, 32, 4)
        x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
        feats, rec = m.node_forward(x, record=True)
        np.testing.assert_allclose(m.fc(feats), m(x), atol=1e-5)
        assert {k: v.shape[1:] for k, v in rec.items()} == {n.name: n.shape for n in nodes}
    full = build_model("resnet20", num_classes=10, in_channels=3)
    assert sum(p.size for p in jax.tree.leaves(nnx_params(full))) == 271690  # Keras resnet_v1 20, no BN
    with pytest.raises(ValueError, match="concern"):
        full(jnp.zeros((1, 32, 32, 3)), {"conv_0": jnp.ones(16)})


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def test_ci_and_ti_on_hand_checkable_inputs():
    model = build_model("resnet20", num_classes=2, in_channels=1, width=1 / 16)  # 1 / 2 / 4 channels
    _identity_stem(model)
    # normalisation mean 0.5, std 1: conv_0's pre-activation is pixel / 255 - 0.5, > 0 only
    # on the bright pixels
    imgs = np.zeros((4, 32, 32, 1), np.uint8)
    imgs[0, 3, 4] = imgs[1, 10, 20] = 255  # class 0
    imgs[2, 7, 7] = imgs[3, 0, 31] = 255  # class 1
    y = np.array([0, 0, 1, 1])
    d = C.decompose(model, imgs, y, (0.5,), (1.0,), C.ConcernConfig(backtrack="none"))
    expect = np.ones((32, 32), bool)
    expect[3, 4] = expect[10, 20] = False  # active for one concerned input: kept
    np.testing.assert_array_equal(d.ci_inactive["conv_0"][0, ..., 0], expect)
    expect[7, 7] = expect[0, 31] = False  # the two negatives (1:1) restore their positions
    np.testing.assert_array_equal(d.inactive["conv_0"][0, ..., 0], expect)
    assert d.stats["negatives"] == [2, 2] and d.stats["concerned"] == [2, 2]
    assert d.stats["ti_restored"][0] >= 2
    # without negatives nothing is restored
    d0 = C.decompose(model, imgs, y, (0.5,), (1.0,), C.ConcernConfig(backtrack="none", negative_ratio=0.0))
    for k in d0.inactive:
        np.testing.assert_array_equal(d0.inactive[k], d0.ci_inactive[k])


def test_vectorised_counts_equal_a_per_class_loop():
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=1)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (36, 32, 32, 1), dtype=np.uint8)
    y = np.arange(36) % 3
    cfg = C.ConcernConfig(backtrack="none", batch_size=16)
    key = jax.random.key(5)
    d = C.decompose(model, imgs, y, (0.4,), (0.3,), cfg, key=key)
    concerned, negatives = C.sample_sets(y, 3, cfg, key)
    for c in range(3):
        assert set(y[concerned[c]]) == {c} and c not in set(y[negatives[c]])
        assert len(negatives[c]) == len(concerned[c]) == 12
        assert sorted(np.bincount(y[negatives[c]], minlength=3)[[q for q in range(3) if q != c]]) == [6, 6]
        _, pos = model.node_forward(jnp.asarray(normalize(imgs[concerned[c]], (0.4,), (0.3,))), record=True)
        _, neg = model.node_forward(jnp.asarray(normalize(imgs[negatives[c]], (0.4,), (0.3,))), record=True)
        for k in pos:
            ci = np.all(np.asarray(pos[k]) <= 0, axis=0)
            np.testing.assert_array_equal(d.ci_inactive[k][c], ci)
            np.testing.assert_array_equal(d.inactive[k][c], ci & np.all(np.asarray(neg[k]) <= 0, axis=0))


def test_channeling_averages_the_unconcerned_columns():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) ** 1.5
    b = np.array([1.0, 2.0, 3.0, 10.0], np.float32)
    hw, hb = C.channel(w, b)
    assert hw.shape == (4, 3, 2) and hb.shape == (4, 2)
    np.testing.assert_allclose(hw[1, :, 0], w[:, 1])
    np.testing.assert_allclose(hw[1, :, 1], w[:, [0, 2, 3]].mean(1), rtol=1e-6)
    np.testing.assert_allclose(hb[3], [10.0, 2.0])
    np.testing.assert_allclose(hb[0], [1.0, 5.0])


def test_backtrack_bln_removes_features_serving_only_the_unconcerned_output():
    hw = np.array([[[1.0, 0.1], [0.1, -1.0], [0.8, 0.9], [0.2, 0.3]]])  # [1, F=4, 2]
    np.testing.assert_array_equal(C.backtrack_bln(hw, 0.5), [[False, True, False, False]])
    np.testing.assert_array_equal(C.backtrack_bln(hw, 0.25), [[False, True, False, True]])
    # in a decomposition, a removed feature deactivates its whole channel of the last node
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=2)
    imgs = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 1), dtype=np.uint8)
    d = C.decompose(model, imgs, np.arange(12) % 3, (0.5,), (0.5,), C.ConcernConfig(backtrack="bln"))
    last = model.nodes()[-1].name
    assert d.removed_features.any()
    for c, f in zip(*np.nonzero(d.removed_features)):
        assert d.inactive[last][c, ..., f].all()
    assert d.stats["bln_removed_features"] == d.removed_features.sum(1).tolist()


def test_positive_probability_and_voting_rule():
    l2 = jnp.asarray([[2.0, -1.0], [0.5, 3.0]])
    want = jax.nn.softmax(jnp.asarray([[2.0, -1.0, 0, 0, 0], [0.5, 3.0, 0, 0, 0]]), -1)[:, 0]
    np.testing.assert_allclose(C.positive_probability(l2, 5), want, rtol=1e-6)
    prob = np.array([[0.2, 0.9, 0.6], [0.2, 0.9, 0.6], [0.2, 0.9, 0.6]])
    pos = np.array([[True, False, False], [True, True, False], [False, False, False]])
    np.testing.assert_array_equal(C.vote(prob, pos), [0, 1, 1])  # single positive wins
    rng = np.random.default_rng(0)
    p, q = rng.random((200, 7)), rng.random((200, 7)) > 0.8
    np.testing.assert_array_equal(np.asarray(C.vote_scores(jnp.asarray(p), jnp.asarray(q))).argmax(-1), C.vote(p, q))
    assert C.topk_accuracy(np.asarray([[0.1, 0.5, 0.4]]), np.asarray([2]), 1) == 0.0
    assert C.topk_accuracy(np.asarray([[0.1, 0.5, 0.4]]), np.asarray([2]), 2) == 1.0


def test_energy_estimate_follows_the_papers_formula():
    e = C.energy_estimate(3600.0, cpu_watts=100.0, dram_watts=20.0, gpu_watts=250.0, gpus=2)
    assert e["kwh"] == pytest.approx(1.58 * 620 / 1000)
    assert e["co2e_lbs"] == pytest.approx(0.954 * 1.58 * 0.62)


@pytest.fixture(scope="session")
def resnet_digits(tmp_path_factory):
    """A narrow ResNet-20 trained on digits by the CLI (default resnet recipe: Adam)."""
    from cnnsplit_jax.cli import main

    out = tmp_path_factory.mktemp("resnet_digits") / "run"
    rc = main(["train", "--model", "resnet20", "--dataset", "digits", "--width", "0.5",
               "--epochs", "20", "--batch-size", "64", "--seed", "0", "--out", str(out)])
    assert rc == 0
    return out


def test_concern_split_on_digits_reproduces_the_model(resnet_digits, tmp_path, capsys):
    from cnnsplit_jax.cli import main
    from cnnsplit_jax.module_set import ConcernModuleSet, load_module_set

    base_acc = json.loads((resnet_digits / "train.json").read_text())["test_accuracy"]
    assert base_acc > 0.9
    res = {}
    for bt in ("none", "bln"):
        out = tmp_path / bt
        assert main(["split", "--method", "concern", "--backtrack", bt, "--model-dir", str(resnet_digits),
                     "--out", str(out)]) == 0
        res[bt] = json.loads((out / "split.json").read_text())
    r = res["none"]
    # CI+TI+MC: composed modules agree with the model on most inputs (measured 1.000 / cost 0)
    assert r["agreement_with_model"] >= 0.95
    assert r["accuracy_loss"] <= 0.03 and r["top5_loss"] <= 0.01
    assert r["composed_top5"] >= r["composed_accuracy"]
    assert 0.5 < r["module_size"]["mean_active_fraction"] < 1.0  # positions were deactivated
    assert r["module_size"]["module_params"] < r["module_size"]["model_params"]  # only the 2-column head
    assert sum(r["decomposition"]["ti_restored"]) > 0
    # MC-BLN deactivates more positions (measured cost 10.8 pt on this narrow model: README)
    b = res["bln"]
    assert b["module_size"]["mean_active_fraction"] < r["module_size"]["mean_active_fraction"]
    assert b["accuracy_loss"] <= 0.25
    ms = load_module_set(tmp_path / "none")
    assert isinstance(ms, ConcernModuleSet) and ms.num_modules == 10
    # `evaluate` reproduces split.json's numbers from the saved module set
    assert main(["evaluate", str(tmp_path / "none")]) == 0
    ev = json.loads((tmp_path / "none" / "evaluate.json").read_text())
    assert ev["composed_accuracy"] == pytest.approx(r["composed_accuracy"])
    # refuses the kernel-mask methods on a ResNet, and a second split into the same directory
    capsys.readouterr()
    assert main(["split", "--method", "grad", "--model-dir", str(resnet_digits), "--out", str(tmp_path / "g")]) == 2
    assert "decomposed with --method concern" in capsys.readouterr().err
    assert main(["split", "--method", "concern", "--model-dir", str(resnet_digits), "--out", str(tmp_path / "none")]) == 2
    assert "already holds" in capsys.readouterr().err


def test_concern_modules_compose_with_the_voting_rule(resnet_digits, tmp_path):
    from cnnsplit_jax.cli import main
    from cnnsplit_jax.compose import Pick, apply, compose
    from cnnsplit_jax.data import load_dataset
    from cnnsplit_jax.evaluate import module_outputs
    from cnnsplit_jax.module_set import load_module_set

    assert main(["split", "--method", "concern", "--backtrack", "none", "--model-dir", str(resnet_digits),
                 "--out", str(tmp_path / "m")]) == 0
    ms = load_module_set(tmp_path / "m")
    x = load_dataset("digits").x_test[:64]
    comp = compose([Pick(ms, c) for c in (3, 0, 7)])
    s = np.asarray(jax.jit(apply)(comp, jnp.asarray(x)))
    prob, pos = module_outputs(ms, x)
    np.testing.assert_allclose(s, np.asarray(C.vote_scores(prob[:, [3, 0, 7]], pos[:, [3, 0, 7]])), atol=1e-5)


def test_cross_model_reuse_with_continuous_learning(tmp_path):
    """Modules of two ResNets trained on disjoint digit classes compose into one 10-class
    model; continuous learning re-runs TI against the classes each model never saw."""
    from cnnsplit_jax.cli import main
    from cnnsplit_jax.module_set import load_module_set
    from cnnsplit_jax.reuse import Source, compose_task, continuous_learning
    from cnnsplit_jax.data import load_task

    mods = []
    for name, spec in (("a", "digits:0-4"), ("b", "digits:5-9")):
        run = tmp_path / f"run_{name}"
        assert main(["train", "--model", "resnet20", "--dataset", spec, "--width", "0.5", "--epochs", "12",
                     "--batch-size", "64", "--out", str(run)]) == 0
        assert main(["split", "--method", "concern", "--backtrack", "none", "--model-dir", str(run),
                     "--out", str(tmp_path / f"mods_{name}")]) == 0
        mods.append(str(tmp_path / f"mods_{name}"))
    assert main(["compose", "--modules", mods[0], "--modules", mods[1], "--continuous-learning",
                 "--out", str(tmp_path / "comp")]) == 0
    res = json.loads((tmp_path / "comp" / "compose.json").read_text())
    assert res["images"] == 287 and len(res["class_names"]) == 10  # digits' last 80% test images
    # measured 0.571 both (the paper's inter-dataset reuse loses 12 pt); chance is 0.1
    assert res["accuracy"] > 0.4 and res["continuous_learning"]["accuracy"] > 0.4
    # library level: continuous learning only restores positions, and only in concern modules
    sources = [Source(m, load_module_set(m)) for m in mods]
    task = load_task("digits:0,1,2,3,4,5,6,7,8,9")
    _, picks = compose_task(sources, task)
    new = continuous_learning(picks, task)
    restored = 0
    for p, q in zip(picks, new):
        c = p.source_class
        for k, v in p.module_set.inactive.items():
            assert not (q.module_set.inactive[k][c] & ~v[c]).any()  # nothing newly deactivated
            restored += int((v[c] & ~q.module_set.inactive[k][c]).sum())
    assert restored > 0
