"""Concern identification (Pan & Rajan): CI / TI on hand-checkable inputs, the vectorised
counts against a per-class loop, channeling, MC-BLN, the energy formula, and the
decomposition of a narrow ResNet-20 trained on digits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.splitters import concern as C
from cnnsplit_jax.data import normalize
from cnnsplit_jax.models import build_model


def _identity_stem(model):
    """conv_0 copies the image into its single channel (centre tap 1, bias 0)."""
    k = np.zeros(model.conv_0.kernel.shape, np.float32)
    k[1, 1, 0, 0] = 1.0
    model.conv_0.kernel[...] = jnp.asarray(k)
    model.conv_0.bias[...] = jnp.zeros_like(model.conv_0.bias[...])


def test_ci_and_ti_on_hand_checkable_inputs():
    model = build_model("resnet20", num_classes=2, in_channels=1, width=1 / 16)  # 1 / 2 / 4 channels
    _identity_stem(model)
    # normalisation mean 0.5, std 1: conv_0's pre-activation is pixel / 255 - 0.5, > 0 only
    # on the bright pixels
    imgs = np.zeros((4, 32, 32, 1), np.uint8)
    imgs[0, 3, 4] = imgs[1, 10, 20] = 255  # class 0
    imgs[2, 7, 7] = imgs[3, 0, 31] = 255  # class 1
    y = np.array([0, 0, 1, 1])
    d = C.decompose(model, imgs, y, (0.5,), (1.0,), C.ConcernConfig(backtrack="none", min_confidence=None))
    expect = np.ones((32, 32), bool)
    expect[3, 4] = expect[10, 20] = False  # active for one concerned input: kept
    np.testing.assert_array_equal(d.ci_inactive["conv_0"][0, ..., 0], expect)
    expect[7, 7] = expect[0, 31] = False  # the two negatives (1:1) restore their positions
    np.testing.assert_array_equal(d.inactive["conv_0"][0, ..., 0], expect)
    assert d.stats["negatives"] == [2, 2] and d.stats["concerned"] == [2, 2]
    # TI's count, against a plain forward of module 0's two negatives (the class-1 images):
    # every node position dead under CI that one of them activates
    x = jnp.asarray(normalize(imgs[2:], (0.5,), (1.0,)))
    _, rec = model.node_forward(x, record=True)  # both mappings recorded; CI's are the default "conv"
    restored = sum(int((d.ci_inactive[k][0] & (np.asarray(v) > 0).any(0)).sum()) for k, v in rec.items()
                   if k in d.ci_inactive)
    assert d.stats["ti_restored"][0] == restored and restored >= 2
    # without negatives nothing is restored: module 0's stem map is CI's hand map
    d0 = C.decompose(model, imgs, y, (0.5,), (1.0,), C.ConcernConfig(backtrack="none", negative_ratio=0.0, min_confidence=None))
    ci_map = np.ones((32, 32), bool)
    ci_map[3, 4] = ci_map[10, 20] = False
    np.testing.assert_array_equal(d0.inactive["conv_0"][0, ..., 0], ci_map)
    assert d0.stats["negatives"] == [0, 0] and d0.stats["ti_restored"] == [0, 0]


@pytest.mark.parametrize("residual", ["conv", "conv_identity", "sum"])
def test_vectorised_counts_equal_a_per_class_loop(residual):
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=1)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (36, 32, 32, 1), dtype=np.uint8)
    y = np.arange(36) % 3
    cfg = C.ConcernConfig(backtrack="none", batch_size=16, min_confidence=None, residual=residual)
    key = jax.random.key(5)
    d = C.decompose(model, imgs, y, (0.4,), (0.3,), cfg, key=key)
    concerned, negatives = C.sample_sets(y, 3, cfg, key)
    for c in range(3):
        assert set(y[concerned[c]]) == {c} and c not in set(y[negatives[c]])
        assert len(negatives[c]) == len(concerned[c]) == 12
        assert sorted(np.bincount(y[negatives[c]], minlength=3)[[q for q in range(3) if q != c]]) == [6, 6]
        _, pos = model.node_forward(jnp.asarray(normalize(imgs[concerned[c]], (0.4,), (0.3,))), record=True)
        _, neg = model.node_forward(jnp.asarray(normalize(imgs[negatives[c]], (0.4,), (0.3,))), record=True)
        assert set(d.ci_inactive) == {nd.name for nd in model.nodes(residual)}
        for k in d.ci_inactive:
            ci = np.all(np.asarray(pos[k]) <= 0, axis=0)
            np.testing.assert_array_equal(d.ci_inactive[k][c], ci)
            np.testing.assert_array_equal(d.inactive[k][c], ci & np.all(np.asarray(neg[k]) <= 0, axis=0))


def test_concerned_inputs_are_the_first_confident_ones_within_the_budget():
    y = np.arange(60) % 3
    key = jax.random.key(2)
    full, _ = C.sample_sets(y, 3, C.ConcernConfig(concerned_per_class=None, min_confidence=None), key)
    asked = []

    def odd_only(idx):  # a stand-in filter: accepts odd image indices
        asked.append(len(idx))
        return idx % 2 == 1

    cfg = C.ConcernConfig(concerned_per_class=3)
    concerned, negatives = C.sample_sets(y, 3, cfg, key, odd_only)
    for c in range(3):
        np.testing.assert_array_equal(concerned[c], [i for i in full[c] if i % 2 == 1][:3])
        assert len(negatives[c]) == 3  # 1:1 with the concerned inputs actually used
    assert sum(asked) < 60  # asked in rounds, only for candidates still needed
    # no budget: every confident input; a class with none falls back, with a warning
    from cnnsplit_jax.progress import RunWarning

    with pytest.warns(RunWarning, match="class 1"):
        concerned, _ = C.sample_sets(y, 3, C.ConcernConfig(concerned_per_class=None), key,
                                     lambda idx: (idx % 2 == 1) & (y[idx] != 1))
    np.testing.assert_array_equal(np.sort(concerned[0]), [i for i in range(60) if y[i] == 0 and i % 2])
    np.testing.assert_array_equal(concerned[1], full[1])
    not_one = lambda idx: (idx % 2 == 1) & (y[idx] != 1)  # noqa: E731
    assert C.unconfident_classes(concerned, not_one) == [1] and C.unconfident_classes(concerned, None) == []
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):  # the option to refuse instead
        C.sample_sets(y, 3, C.ConcernConfig(concerned_per_class=None, unconfident="refuse"), key, not_one)


def test_confidence_filter_equals_the_softmax_of_the_models_logits():
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=3)
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (40, 32, 32, 1), dtype=np.uint8)
    feats = np.asarray(model.node_forward(jnp.asarray(normalize(imgs, (0.4,), (0.3,)))), np.float64)
    logits = feats @ np.asarray(model.fc.kernel[...], np.float64) + np.asarray(model.fc.bias[...], np.float64)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    y = logits.argmax(1).copy()
    y[::4] = (y[::4] + 1) % 3  # a quarter labelled against the model
    thr = float(np.median(prob.max(1)))
    want = (logits.argmax(1) == y) & (prob[np.arange(40), y] > thr)
    assert 5 < want.sum() < 35
    got = C.confidence_filter(model, imgs, y, (0.4,), (0.3,), thr, batch_size=16)(np.arange(40))
    np.testing.assert_array_equal(got, want)


def test_channeling_averages_the_unconcerned_columns():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) ** 1.5
    b = np.array([1.0, 2.0, 3.0, 10.0], np.float32)
    hw, hb = C.channel(w, b)
    assert hw.shape == (4, 3, 2) and hb.shape == (4, 2)
    np.testing.assert_allclose(hw[1, :, 0], w[:, 1])
    np.testing.assert_allclose(hw[1, :, 1], w[:, [0, 2, 3]].mean(1), rtol=1e-6)
    np.testing.assert_allclose(hb[3], [10.0, 2.0])
    np.testing.assert_allclose(hb[0], [1.0, 5.0])


def test_the_listing_rule_and_the_prose_readings_pick_four_different_sets():
    """Algorithm 2, line 5, as printed: remove feature i when W[i, V_uc] <= -delta and
    W[i, V_c] >= +delta (delta 0.5). Rows [W(V_c), W(V_uc)]; every set worked out by hand."""
    hw = np.array([[[1.0, 0.1], [0.1, -1.0], [0.2, 0.9], [0.6, 0.7], [-0.8, -0.7], [0.7, -0.6], [0.5, -0.5]]])
    picks = {r: np.flatnonzero(C.backtrack_bln(hw, 0.5, r)[0]).tolist() for r in C.BLN_RULES}
    assert picks == {"listing": [5, 6],  # both bounds inclusive: row 6 sits on them
                     "absolute": [2],  # V_uc > .5 and not V_c > .5
                     "negative": [1, 5],  # V_uc < -.5 (strict: row 6's -0.5 is not) and not V_c < -.5
                     "relative": [1, 2]}  # |w| >= .5 x the column's max |w| (1.0 both)
    assert C.backtrack_bln(hw, 0.5).tolist() == C.backtrack_bln(hw, 0.5, "listing").tolist()  # the default


def test_backtrack_bln_removes_features_serving_only_the_unconcerned_output():
    hw = np.array([[[1.0, 0.1], [0.1, -1.0], [0.8, 0.9], [0.2, 0.3]]])  # [1, F=4, 2]
    np.testing.assert_array_equal(C.backtrack_bln(hw, 0.5, "relative"), [[False, True, False, False]])
    np.testing.assert_array_equal(C.backtrack_bln(hw, 0.25, "relative"), [[False, True, False, True]])
    # the absolute, signed reading: only a strong positive unconcerned edge counts
    hw2 = np.array([[[1.0, 0.1], [0.1, -1.0], [0.2, 0.9], [0.6, 0.7], [-0.8, -0.7]]])
    np.testing.assert_array_equal(C.backtrack_bln(hw2, 0.5, "absolute"), [[False, False, True, False, False]])
    np.testing.assert_array_equal(C.backtrack_bln(hw2, 0.5, "relative"), [[False, True, True, False, False]])
    np.testing.assert_array_equal(C.backtrack_bln(hw2, 0.95, "absolute"), [[False] * 5])
    # the opposite sign: a strongly negative unconcerned edge, unless the concerned one is too
    np.testing.assert_array_equal(C.backtrack_bln(hw2, 0.5, "negative"), [[False, True, False, False, False]])
    assert C.ConcernConfig().bln_rule == "listing" and C.ConcernConfig().residual == "conv"
    with pytest.raises(ValueError, match="bln_rule"):
        C.ConcernConfig(bln_rule="signed")
    # in a decomposition, a removed feature deactivates its whole channel of the last node
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=2)
    imgs = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 1), dtype=np.uint8)
    d = C.decompose(model, imgs, np.arange(12) % 3, (0.5,), (0.5,), C.ConcernConfig(backtrack="bln", min_confidence=None,
                                                                                   bln_rule="relative"))
    assert d.removed_features.any()
    # under the paper's mapping conv2's branch into the last Add loses the feature (the identity
    # shortcut has no map) and its head row is zero
    assert "s2b2_short" not in d.inactive
    assert (d.head_w[d.removed_features] == 0).all() and (d.head_w[~d.removed_features] != 0).any()
    for last in ("s2b2_conv2",):
        for c, f in zip(*np.nonzero(d.removed_features)):
            assert d.inactive[last][c, ..., f].all()
        kept = ~d.removed_features
        assert not d.inactive[last].all(axis=(1, 2))[kept].any()
    # the relative rule by hand on the channeled head: V_uc = the mean of the other columns
    w = np.asarray(model.fc.kernel[...])
    want = []
    for c in range(3):
        vc, vuc = w[:, c], w[:, [j for j in range(3) if j != c]].mean(1)
        strong = lambda v: np.abs(v) >= 0.5 * np.abs(v).max()  # noqa: E731
        want.append(strong(vuc) & ~strong(vc))
    np.testing.assert_array_equal(d.removed_features, np.stack(want))
    assert d.stats["bln_removed_features"] == np.stack(want).sum(1).tolist()


def test_energy_estimate_follows_the_papers_formula():
    e = C.energy_estimate(3600.0, cpu_watts=100.0, dram_watts=20.0, gpu_watts=250.0, gpus=2)
    assert e["kwh"] == pytest.approx(1.58 * 620 / 1000)
    assert e["co2e_lbs"] == pytest.approx(0.954 * 1.58 * 0.62)




def test_concern_split_on_digits_reproduces_the_model(concern_modules, resnet_digits):
    from cnnsplit_jax.modules.module_set import load_module_set

    base_acc = json.loads((resnet_digits / "train.json").read_text())["test_accuracy"]
    assert base_acc > 0.9
    res = {bt: json.loads((d / "split.json").read_text()) for bt, d in concern_modules.items()}
    r = res["none"]
    # CI+TI+MC under the exact `sum` mapping: a concerned input's forward pass is unchanged
    # (measured agreement 1.000, cost 0)
    assert r["agreement_with_model"] >= 0.95
    assert r["accuracy_loss"] <= 0.03 and r["top5_loss"] <= 0.01
    assert 0.5 < r["module_size"]["mean_active_fraction"] < 1.0  # positions were deactivated
    assert sum(r["decomposition"]["ti_restored"]) > 0
    # the defaults: the paper's mapping masks conv2's output and the shortcut before each Add
    b = res["bln"]
    assert b["config"]["residual"] == "conv" and b["config"]["bln_rule"] == "listing"
    assert b["accuracy_loss"] >= r["accuracy_loss"]
    ms = load_module_set(concern_modules["bln"])
    assert ms.set_kind == "concern" and ms.retangles and ms.num_modules == 10 and ms.residual == "conv"
    # positions, by hand: ResNet-20 at width 0.5 has 8 / 16 / 32 channels at 32 / 16 / 8 px;
    # `sum`: the stem + per block conv1 and the Add; `conv`: conv1 and conv2 per block, and the
    # two projection shortcuts (stages 2 and 3) -- no node for an identity shortcut
    per_stage = 32 * 32 * 8 + 16 * 16 * 16 + 8 * 8 * 32
    assert r["module_size"]["positions"] == 32 * 32 * 8 + 3 * 2 * per_stage
    assert b["module_size"]["positions"] == 32 * 32 * 8 + 3 * 2 * per_stage + 16 * 16 * 16 + 8 * 8 * 32
