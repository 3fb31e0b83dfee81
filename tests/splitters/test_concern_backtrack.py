"""Concern identification's residual mappings, MC-BI and the paper's weight Jaccard index,
each against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.data import normalize
from cnnsplit_jax.models import build_model, count_params
from cnnsplit_jax.modules.module_set import ConcernModuleSet
from cnnsplit_jax.modules.weight_jaccard import weight_jaccard
from cnnsplit_jax.splitters import concern as C


def test_window_reach_follows_same_padding_and_strides():
    # 3x3 stride 2 on 4x4 -> 2x2; TF SAME pads (0, 1): output (0, 0) reads rows/cols 0..2
    alive = np.zeros((1, 2, 2), bool)
    alive[0, 0, 0] = True
    want = np.zeros((4, 4), bool)
    want[:3, :3] = True
    np.testing.assert_array_equal(C.window_reach(alive, (4, 4), 3, 2)[0], want)
    alive = np.zeros((1, 2, 2), bool)
    alive[0, 1, 1] = True  # reads rows/cols 2..4; row/col 4 is padding
    want = np.zeros((4, 4), bool)
    want[2:, 2:] = True
    np.testing.assert_array_equal(C.window_reach(alive, (4, 4), 3, 2)[0], want)
    # 3x3 stride 1 on 4x4: the corner output reads the 2x2 corner (the rest is padding)
    alive = np.zeros((1, 4, 4), bool)
    alive[0, 3, 3] = True
    want = np.zeros((4, 4), bool)
    want[2:, 2:] = True
    np.testing.assert_array_equal(C.window_reach(alive, (4, 4), 3, 1)[0], want)
    # 1x1 stride 2: output (1, 0) reads input (2, 0) only
    alive = np.zeros((1, 2, 2), bool)
    alive[0, 1, 0] = True
    want = np.zeros((4, 4), bool)
    want[2, 0] = True
    np.testing.assert_array_equal(C.window_reach(alive, (4, 4), 1, 2)[0], want)


@pytest.mark.parametrize("residual", ["sum", "conv_identity", "conv"])
def test_output_preserving_mc_bi_walks_back_from_a_single_live_output_position(residual):
    model = build_model("resnet20", num_classes=2, in_channels=1, width=1 / 16)  # 1 / 2 / 4 channels
    nodes = model.nodes(residual)
    inactive = {nd.name: np.zeros((1, *nd.shape), bool) for nd in nodes}
    for name in model.feature_nodes(residual):  # the last block keeps one position: (0, 0, ch 0)
        inactive[name][:] = True
        inactive[name][0, 0, 0, 0] = False
    out = C.backtrack_input(model, inactive, residual, "preserving")
    # s2b2's conv2 (3x3, stride 1) reads conv1 rows/cols 0..1 for output (0, 0)
    want = np.ones((8, 8, 4), bool)
    want[:2, :2, :] = False
    np.testing.assert_array_equal(out["s2b2_conv1"][0], want)
    # the block's input (s2b1's output) feeds conv1 over rows/cols 0..2 (from conv1's live
    # 0..1) and the identity shortcut at (0, 0, ch 0) only
    want = np.ones((8, 8, 4), bool)
    want[:3, :3, :] = False
    prev = {"sum": ("s2b1_add",), "conv_identity": ("s2b1_conv2", "s2b1_short")}.get(residual, ("s2b1_conv2",))
    if residual == "conv":  # an unmasked identity shortcut reads every position: nothing is dead
        want[:] = False
        assert "s2b1_short" not in out
    for name in prev:
        np.testing.assert_array_equal(out[name][0], want)
    # nothing is taken back; the stem, which still feeds live positions, loses nothing
    for k in inactive:
        assert (out[k] >= inactive[k]).all()
    assert not out["conv_0"].any()


@pytest.mark.parametrize("residual", ["sum", "conv_identity", "conv"])
def test_output_preserving_mc_bi_never_changes_what_a_module_computes(residual):
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=4)
    rng = np.random.default_rng(3)
    # arbitrary maps with most positions deactivated, so that whole windows die
    inactive = {nd.name: rng.random((2, *nd.shape)) < 0.85 for nd in model.nodes(residual)}
    out = C.backtrack_input(model, inactive, residual, "preserving")
    assert sum(int((out[k] & ~inactive[k]).sum()) for k in out) > 300
    x = jnp.asarray(normalize(rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8), (0.4,), (0.3,)))
    for c in range(2):
        keep = lambda m: {k: jnp.asarray(1.0 - v[c]) for k, v in m.items()}  # noqa: E731
        np.testing.assert_allclose(model.node_forward(x, keep(out)), model.node_forward(x, keep(inactive)),
                                   rtol=0, atol=1e-6)
    # the paper's rule on the same maps deactivates more: it does not consult the shortcuts
    listing = C.backtrack_input(model, inactive, residual, "listing")
    assert sum(int(listing[k].sum()) for k in out) > sum(int(out[k].sum()) for k in out)
    # in a decomposition the counts say how many positions MC-BI (the listing) added to MC-BLN's maps
    imgs = rng.integers(0, 256, (24, 32, 32, 1), dtype=np.uint8)
    cfg = dict(min_confidence=None, residual=residual, concerned_per_class=1)  # one input: many dead windows
    y = np.arange(24) % 3
    bln = C.decompose(model, imgs, y, (0.4,), (0.3,), C.ConcernConfig(backtrack="bln", **cfg))
    bi = C.decompose(model, imgs, y, (0.4,), (0.3,), C.ConcernConfig(backtrack="bi", **cfg))
    added = [sum(int((bi.inactive[k][i] & ~bln.inactive[k][i]).sum()) for k in bln.inactive) for i in range(3)]
    assert bi.stats["bi_deactivated"] == added and sum(added) > 0
    assert bi.stats["inactive"] == [sum(int(v[i].sum()) for v in bi.inactive.values()) for i in range(3)]


@pytest.mark.parametrize("residual", ["conv_identity", "conv"])
def test_mc_bi_as_algorithm_3_consults_only_the_conv_and_changes_the_output(residual):
    """Algorithm 3 by hand: module 0 has every output of s0b1's conv1 deactivated, nothing
    else. Every position of the tensor feeding s0b1 then feeds only dead conv1 outputs, so
    the listing deactivates it (the maps of the Add that made it: s0b0's conv2, and its
    identity shortcut where the mapping gives it one); that kills s0b0's conv1 outputs and
    the stem in turn, each read by one conv and an identity shortcut. The output-preserving
    rule keeps all of it (the shortcut still reads it), and the module's output differs
    between the two; module 1 is untouched."""
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=9)
    inactive = {nd.name: np.zeros((2, *nd.shape), bool) for nd in model.nodes(residual)}
    inactive["s0b1_conv1"][0] = True
    listing = C.backtrack_input(model, inactive, residual, "listing")
    preserving = C.backtrack_input(model, inactive, residual, "preserving")
    killed = {"s0b0_conv2", "s0b0_conv1", "conv_0"} | ({"s0b0_short"} if residual == "conv_identity" else set())
    for name in killed:
        assert listing[name][0].all() and not preserving[name][0].any(), name
    changed = {k for k in inactive if (listing[k] != inactive[k]).any()}
    assert changed == killed
    assert not any(listing[k][1].any() for k in listing)  # module 1 had nothing deactivated
    assert all((preserving[k] == inactive[k]).all() for k in inactive)
    x = jnp.asarray(normalize(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8),
                              (0.4,), (0.3,)))
    keep = lambda m: {k: jnp.asarray(1.0 - v[0]) for k, v in m.items()}  # noqa: E731
    before = np.asarray(model.node_forward(x, keep(inactive)))
    np.testing.assert_allclose(np.asarray(model.node_forward(x, keep(preserving))), before, atol=1e-6, rtol=0)
    assert np.abs(np.asarray(model.node_forward(x, keep(listing))) - before).max() > 1e-3
    with pytest.raises(ValueError, match="rule"):
        C.backtrack_input(model, inactive, residual, "exact")


def test_conv_mapping_masks_a_branch_before_the_add_and_sum_mapping_after():
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=6)
    x = jnp.asarray(normalize(np.random.default_rng(0).integers(0, 256, (1, 32, 32, 1), dtype=np.uint8),
                              (0.4,), (0.3,)))
    feats, rec = model.node_forward(x, record=True)
    conv2, short = np.asarray(rec["s2b2_conv2"][0]), np.asarray(rec["s2b2_short"][0])
    np.testing.assert_allclose(np.asarray(rec["s2b2_add"][0]), conv2 + short, rtol=1e-5, atol=1e-5)
    # a position where conv2 is negative and the sum positive: dropping conv2 there raises
    # the feature by (relu(short) - relu(conv2 + short)) / 64
    i, j, ch = np.argwhere((conv2 < 0) & (conv2 + short > 0))[0]
    keep = {nd.name: np.ones(nd.shape, np.float32) for nd in model.nodes("conv")}
    keep["s2b2_conv2"][i, j, ch] = 0.0
    got = np.asarray(model.node_forward(x, {k: jnp.asarray(v) for k, v in keep.items()}))[0]
    want = np.asarray(feats[0]).copy()
    want[ch] += (max(short[i, j, ch], 0) - (conv2 + short)[i, j, ch]) / 64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the sum mapping zeroes the position itself
    keep = {"s2b2_add": np.ones((8, 8, 8), np.float32)}
    keep["s2b2_add"][i, j, ch] = 0.0
    got = np.asarray(model.node_forward(x, {k: jnp.asarray(v) for k, v in keep.items()}))[0]
    want = np.asarray(feats[0]).copy()
    want[ch] -= (conv2 + short)[i, j, ch] / 64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mix residual mappings"):
        model.node_forward(x, {"s2b2_add": jnp.ones((8, 8, 8)), "s2b2_conv2": jnp.ones((8, 8, 8))})


def test_conv_mapping_never_masks_an_identity_shortcut():
    """By hand: with both conv nodes of the last block (an identity block) deactivated, the
    conv-only mapping passes the block's input through, so the pooled features are the mean of
    that input (recorded as the identity branch); ``conv_identity`` also masks that branch and
    the features vanish. Decomposition maps under ``conv`` have no identity-shortcut node."""
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=5)
    x = jnp.asarray(normalize(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8),
                              (0.4,), (0.3,)))
    _, rec = model.node_forward(x, record=True)
    block_input = np.asarray(rec["s2b2_short"])  # the identity branch: s2b1's output, >= 0
    assert (block_input > 0).any()
    dead = {"s2b2_conv1": jnp.zeros((8, 8, 8)), "s2b2_conv2": jnp.zeros((8, 8, 8))}
    np.testing.assert_allclose(np.asarray(model.node_forward(x, dead)), block_input.mean((1, 2)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.node_forward(x, {**dead, "s2b2_short": jnp.zeros((8, 8, 8))})),
                               0.0, atol=0)
    imgs = np.random.default_rng(2).integers(0, 256, (12, 32, 32, 1), dtype=np.uint8)
    dec = C.decompose(model, imgs, np.arange(12) % 3, (0.4,), (0.3,),
                      C.ConcernConfig(min_confidence=None, residual="conv", backtrack="bi"))
    assert set(dec.inactive) == {nd.name for nd in model.nodes("conv")}
    assert {k for k in dec.inactive if k.endswith("_short")} == {"s1b0_short", "s2b0_short"}


def test_module_sets_saved_when_conv_masked_the_identity_load_as_conv_identity(tmp_path):
    """Migration: before RESIDUAL_REVISION 2, ``"conv"`` also masked identity shortcuts. A set
    written then (``residual: "conv"``, no revision, identity-shortcut maps) loads as
    ``conv_identity`` with its maps intact; a set written now says what it is."""
    import json

    from cnnsplit_jax.modules.module_set import RESIDUAL_REVISION, load_module_set, save_module_set

    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=3)
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (12, 32, 32, 1), dtype=np.uint8)
    sets = {}
    for residual in ("conv_identity", "conv"):
        dec = C.decompose(model, imgs, np.arange(12) % 3, (0.4,), (0.3,),
                          C.ConcernConfig(min_confidence=None, residual=residual, backtrack="bi"))
        ms = ConcernModuleSet(model, dec.inactive, dec.head_w, dec.head_b, dec.removed_features,
                              {"method": "concern", "normalization": {"mean": [0.4], "std": [0.3]}})
        assert ms.residual == residual  # no recorded mapping: the maps' node names tell
        save_module_set(tmp_path / residual, ms)
        sets[residual] = ms
    meta = json.loads((tmp_path / "conv" / "modules.json").read_text())
    assert meta["residual"] == "conv" and meta["residual_revision"] == RESIDUAL_REVISION
    assert load_module_set(tmp_path / "conv").residual == "conv"
    legacy = tmp_path / "conv_identity" / "modules.json"  # as the library wrote it before
    meta = json.loads(legacy.read_text())
    meta["residual"] = "conv"
    del meta["residual_revision"]
    legacy.write_text(json.dumps(meta))
    old = load_module_set(tmp_path / "conv_identity")
    assert old.residual == "conv_identity" and "s0b0_short" in old.inactive
    for k, v in sets["conv_identity"].inactive.items():
        np.testing.assert_array_equal(old.inactive[k], v)


def test_weight_jaccard_counts_dropped_channels_and_the_channeled_head():
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=7)  # 2 / 4 / 8 channels
    n, k, f = 3, 3, model.fc_in
    rng = np.random.default_rng(0)
    for spec in model.topology:  # conv biases start at 0: make every weight a distinct non-zero float
        layer = getattr(model, spec.name)
        layer.bias[...] = jnp.asarray(rng.uniform(0.1, 1.0, layer.bias.shape), jnp.float32)
    inactive = {nd.name: np.zeros((n, *nd.shape), bool) for nd in model.nodes("conv")}
    inactive["conv_0"][0, ..., 1] = True  # module 0: conv_0's channel 1 deactivated everywhere
    hw, hb = C.channel(model.fc.kernel[...], model.fc.bias[...])
    ms = ConcernModuleSet(model, inactive, hw, hb, np.zeros((n, f), bool), {})
    p = count_params(model)
    dropped = 9 * 1 + 1  # conv_0 channel 1: a 3x3x1 kernel and a bias
    changed = (f + 1) * (k - 1)  # the output columns other than the concerned one
    pos = weight_jaccard(ms, "positions")
    np.testing.assert_allclose(pos, [(p - dropped - changed) / p, (p - changed) / p, (p - changed) / p])
    # by distinct values: the module adds 0 and the f + 1 channeled values
    vals = weight_jaccard(ms, "values")
    np.testing.assert_allclose(vals, [(p - dropped - changed) / (p + f + 2), (p - changed) / (p + f + 2),
                                      (p - changed) / (p + f + 2)])
    # the lab's function, transcribed from the spec: kernels only, value sets intersected, the
    # union over list lengths
    kernels = [np.asarray(getattr(model, s.name).kernel[...]).ravel() for s in model.topology] + [
        np.asarray(model.fc.kernel[...]).ravel()]
    pk = sum(a.size for a in kernels)
    conv0 = np.asarray(model.conv_0.kernel[...])
    w_fc = np.asarray(model.fc.kernel[...])
    for i in range(n):
        mod = [np.asarray(getattr(model, s.name).kernel[...]).copy() for s in model.topology]
        if i == 0:
            mod[0] = conv0.copy()
            mod[0][..., 1] = 0.0
        fc = np.zeros_like(w_fc)
        fc[:, i], fc[:, 0 if i else 1] = hw[i, :, 0], hw[i, :, 1]
        a = np.concatenate([m.ravel() for m in mod] + [fc.ravel()])
        inter = len(set(a.tolist()) & set(np.concatenate(kernels).tolist()))
        assert weight_jaccard(ms, "lab")[i] == pytest.approx(inter / (a.size + pk - inter))
    assert weight_jaccard(ms, "lab")[0] == pytest.approx((pk - 9 - f * (k - 1)) / (pk + 9 + f * (k - 1)))
    assert ms.structure()["mean_jaccard_vs_model"] == pytest.approx(
        np.mean([(p - dropped - changed) / (p + f + 2), (p - changed) / (p + f + 2), (p - changed) / (p + f + 2)]))
