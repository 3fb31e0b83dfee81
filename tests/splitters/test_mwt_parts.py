"""MwT's building blocks against oracles we did not write: PyTorch modules and ops on the same
weights (transcribed here from spec mwt.md), and values computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.splitters import mwt


def test_generator_hidden_width_rule():
    assert [mwt.generator_hidden(c) for c in (1, 64, 127, 128, 512)] == [1, 64, 127, 64, 256]
    with pytest.raises(ValueError, match="output kernel"):
        mwt.generator_hidden(0)


def test_generator_equals_a_pytorch_generator_with_the_same_weights():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    for c_in, c_out in ((3, 8), (16, 130)):
        p = mwt.init_generator(jax.random.key(c_in), c_in, c_out)
        h = mwt.generator_hidden(c_out)
        seq = nn.Sequential(nn.Linear(c_in, h, bias=False), nn.ReLU(), nn.Linear(h, c_out))
        with torch.no_grad():
            seq[0].weight.copy_(torch.from_numpy(np.asarray(p["w1"]).T.copy()))
            seq[2].weight.copy_(torch.from_numpy(np.asarray(p["w2"]).T.copy()))
            seq[2].bias.copy_(torch.from_numpy(np.asarray(p["b2"]).copy()))
        x = np.random.default_rng(0).normal(size=(5, 6, 7, c_in)).astype(np.float32)
        x[0] = 0.0  # a zero input: the mask is relu(tanh(b2)) = tanh(1)
        with torch.no_grad():
            pooled = nn.AdaptiveAvgPool2d(1)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).flatten(1)
            want = torch.relu(torch.tanh(seq(pooled))).numpy()
        got = np.asarray(mwt.generator_mask(p, jnp.asarray(x)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[0], np.tanh(1.0), rtol=1e-6)
        assert (got >= 0).all() and (got < 1).all()
        shut = {**p, "b2": jnp.full((c_out,), -50.0)}  # relu(tanh(negative)) closes a kernel: exactly 0
        assert (np.asarray(mwt.generator_mask(shut, jnp.asarray(x[1:2]) * 0)) == 0).all()
    with pytest.raises(ValueError, match="input channels"):
        mwt.generator_mask(p, jnp.zeros((1, 4, 4, 3)))


def test_generator_init_is_kaiming_normal_with_open_bias():
    p = mwt.init_generator(jax.random.key(0), 256, 256)  # hidden 128
    assert p["w1"].shape == (256, 128) and p["w2"].shape == (128, 256)
    np.testing.assert_array_equal(np.asarray(p["b2"]), 1.0)
    # PyTorch's kaiming_normal_ default: std = sqrt(2 / fan_in), fan_in = the Linear's inputs
    assert np.std(np.asarray(p["w1"])) == pytest.approx(np.sqrt(2 / 256), rel=0.03)
    assert np.std(np.asarray(p["w2"])) == pytest.approx(np.sqrt(2 / 128), rel=0.03)
    assert abs(float(np.mean(np.asarray(p["w1"])))) < 0.01


def _torch_losses(torch, masks, labels):
    """Spec mwt.md's loss, written with PyTorch's ops: F.normalize, mm, the upper triangle."""
    F = torch.nn.functional
    lab = torch.as_tensor(labels)
    tmp = lab.unsqueeze(0) - lab.unsqueeze(1)
    gt = torch.ones_like(tmp)
    gt[tmp != 0] = 0
    upper = torch.triu(torch.ones_like(gt), diagonal=1) == 1
    gt = gt[upper]
    coh, cou, rate = [], [], []
    for m in masks:
        u = F.normalize(m, p=2, dim=1)
        s = torch.mm(u, u.T)[upper]
        coh.append(1 - s[gt == 1].mean())
        cou.append(s[gt == 0].mean())
        rate.append(torch.mean((m > 0).float()))
    return sum(coh) / len(coh), sum(cou) / len(cou), sum(rate) / len(rate)


def test_mask_losses_equal_pytorch_values_and_gradients():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 1, 2, 0, 2, 1, 0])
    m1 = np.maximum(rng.normal(size=(8, 6)), 0).astype(np.float32)  # ~half the entries exactly 0
    m2 = np.maximum(rng.normal(size=(8, 3)), 0).astype(np.float32)
    m2[3] = m2[1]  # a tie: equal masks, cosine 1
    m1[5] = 0.0  # a closed sample: cosine 0 with everyone
    got = mwt.mask_losses([jnp.asarray(m1), jnp.asarray(m2)], jnp.asarray(labels))
    t1, t2 = torch.tensor(m1, requires_grad=True), torch.tensor(m2, requires_grad=True)
    coh, cou, rate = (v.detach() for v in _torch_losses(torch, [t1, t2], labels))
    assert float(got["cohesion"]) == pytest.approx(float(coh), abs=1e-6)
    assert float(got["coupling"]) == pytest.approx(float(cou), abs=1e-6)
    assert float(got["kernel_rate"]) == pytest.approx(float(rate), abs=1e-7)
    # the training loss and its gradient with respect to the masks (no all-zero row here:
    # F.normalize's gradient at a zero vector is a convention of each library)
    m1[5] = rng.uniform(0.1, 1, 6)
    logits = rng.normal(size=(8, 3)).astype(np.float32)
    loss_fn = lambda a, b: mwt.mwt_loss(jnp.asarray(logits), jnp.asarray(labels), [a, b])[0]  # noqa: E731
    g1, g2 = jax.grad(loss_fn, argnums=(0, 1))(jnp.asarray(m1), jnp.asarray(m2))
    t1, t2 = torch.tensor(m1, requires_grad=True), torch.tensor(m2, requires_grad=True)
    coh, cou, _ = _torch_losses(torch, [t1, t2], labels)
    tl = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)) + 0.5 * coh + 1.5 * cou
    tl.backward()
    assert float(loss_fn(jnp.asarray(m1), jnp.asarray(m2))) == pytest.approx(float(tl.detach()), abs=1e-5)
    np.testing.assert_allclose(np.asarray(g1), t1.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g2), t2.grad.numpy(), atol=1e-6)


def test_mask_losses_by_hand():
    lab = jnp.asarray([0, 0, 1])
    r = mwt.mask_losses([jnp.asarray([[1.0, 0], [1, 0], [0, 1]])], lab)  # perfect modules
    assert float(r["cohesion"]) == pytest.approx(0.0) and float(r["coupling"]) == pytest.approx(0.0)
    assert float(r["kernel_rate"]) == pytest.approx(0.5)
    # cos(0, 1) = cos(0, 2) = 1 / sqrt(2), cos(1, 2) = 0: cohesion 1 - 0.7071, coupling 0.3536
    r = mwt.mask_losses([jnp.asarray([[1.0, 1], [1, 0], [0, 1]])], lab)
    assert float(r["cohesion"]) == pytest.approx(1 - 2 ** -0.5) and float(r["coupling"]) == pytest.approx(2 ** -0.5 / 2)
    # an all-zero mask has cosine 0 with every mask; two layers are averaged
    r = mwt.mask_losses([jnp.asarray([[0.0, 0], [1, 0], [1, 0]]), jnp.asarray([[1.0], [1], [1]])], lab)
    assert float(r["cohesion"]) == pytest.approx((1.0 + 0.0) / 2) and float(r["coupling"]) == pytest.approx((0.5 + 1.0) / 2)
    # no same-label pair: nothing to pull together (the reference's empty mean would be NaN)
    r = mwt.mask_losses([jnp.asarray([[1.0, 0], [0, 1]])], jnp.asarray([0, 1]))
    assert float(r["cohesion"]) == 0.0 and float(r["coupling"]) == 0.0
    loss, parts = mwt.mwt_loss(jnp.zeros((3, 2)), lab, [jnp.asarray([[1.0, 1], [1, 0], [0, 1]])], alpha=2.0, beta=3.0)
    assert float(parts["ce"]) == pytest.approx(np.log(2))
    assert float(loss) == pytest.approx(np.log(2) + 2 * (1 - 2 ** -0.5) + 3 * 2 ** -0.5 / 2, rel=1e-6)
    with pytest.raises(ValueError, match="B=3"):
        mwt.mask_losses([jnp.ones((2, 4))], lab)


def test_layer_threshold_is_lowered_in_steps_as_the_reference():
    assert mwt.layer_threshold(np.array([0.95, 0.2])) == 0.9
    # 0.84 misses 0.9 and 0.85 (= 0.9 - 0.05 in floats), meets 0.9 - 0.05 - 0.05
    assert mwt.layer_threshold(np.array([0.2, 0.84, 0.1])) == 0.9 - 0.05 - 0.05
    # 17 of 20 samples: 0.85 in float32 equals float32(0.9 - 0.05), so the first step keeps it
    assert mwt.layer_threshold(np.array([17 / 20], np.float32)) == 0.9 - 0.05
    # the last threshold tried is 0.9 - 17 x 0.05 (0.05 up to rounding): 0.06 is kept there,
    # 0.001 is not (the next step falls to -2e-16 <= 0)
    t, want = mwt.layer_threshold(np.array([0.06, 0.0])), 0.9
    for _ in range(17):  # the reference's `cur_thres -= 0.05`, seventeen times
        want -= 0.05
    assert t == want and t == pytest.approx(0.05)
    for freq in ([0.001, 0.0], [0.0] * 4):
        with pytest.raises(ValueError, match="lowest threshold"):
            mwt.layer_threshold(np.array(freq))


def _torch_rolling_jaccard(torch, masks):
    """Spec mwt.md's "pairwise" Jaccard, with PyTorch ops: rows against rolled rows."""
    m = torch.as_tensor(masks).int()
    n = m.shape[0]
    idx, res = list(range(n)), []
    for _ in range(n - 1):
        idx = idx[1:] + [idx[0]]
        rolled = m[idx]
        res.append(torch.mean(torch.sum(m * rolled, 1) / torch.sum(((m + rolled) > 0).int(), 1)))
    return float(torch.mean(torch.stack(res)))


def test_rolling_jaccard_by_hand_and_against_pytorch():
    # shift 1: (0,1) 1/2, (1,2) 0/1, (2,0) 0/2; shift 2: (0,2) 0/2, (1,0) 1/2, (2,1) 0/1
    assert mwt.rolling_jaccard(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], bool)) == pytest.approx(1 / 6)
    # two empty rows have no index: left out, where the reference's mean turns NaN
    assert mwt.rolling_jaccard(np.array([[0, 0], [0, 0], [1, 0]], bool)) == 0.0
    assert np.isnan(mwt.rolling_jaccard(np.zeros((3, 2), bool))) and np.isnan(mwt.rolling_jaccard(np.ones((1, 2), bool)))
    torch = pytest.importorskip("torch")
    m = np.random.default_rng(2).random((7, 11)) < 0.5
    m[:, 0] = True  # no empty row
    assert mwt.rolling_jaccard(m) == pytest.approx(_torch_rolling_jaccard(torch, m), abs=1e-6)


def test_pairwise_jaccard_by_hand_and_against_pytorch():
    """Every pair i < j, as the reference's ``calculate_cohesion`` (for CNNSplitter's modules)."""
    # pairs: (0,1) 1/2, (0,2) 0/2, (0,3) 0/2, (1,2) 0/1, (1,3) 0/1; (2,3) two empty rows: no index
    m = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], bool)
    assert mwt.pairwise_jaccard(m) == pytest.approx(0.5 / 5)
    assert np.isnan(mwt.pairwise_jaccard(np.zeros((3, 2), bool))) and np.isnan(mwt.pairwise_jaccard(np.ones((1, 2))))
    torch = pytest.importorskip("torch")
    m = np.random.default_rng(4).random((9, 13)) < 0.4
    m[:, 0] = True  # no empty row, as the reference's mean needs
    t = torch.tensor(m, dtype=torch.float32)
    inter = torch.mm(t, t.T)
    union = torch.stack([((t[i] + t) > 0).sum(-1) for i in range(len(t))]).float()
    upper = torch.triu(torch.ones_like(inter), diagonal=1) == 1
    assert mwt.pairwise_jaccard(m) == pytest.approx(float((inter[upper] / union[upper]).mean()), abs=1e-6)


def test_activation_cohesion_against_active_kernels_computed_by_hand():
    """The cohesion of post-training modules: per class, the module's kernels active for each
    of its images (output after ReLU, averaged over positions, > 0), by hand with lax's conv on a
    user's Linen model, then the Jaccard index of every pair of images, written out."""
    import itertools

    from flax import linen as nn

    import cnnsplit_jax as cs
    from cnnsplit_jax.modules import ModuleSet

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Conv(4, (3, 3))(x)).mean((1, 2)))

    net = Net()
    v = net.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
    v["params"]["Conv_0"]["kernel"] = jnp.ones((3, 3, 1, 4)) / 9 * jnp.array([1.0, 1.0, -1.0, 1.0])
    v["params"]["Conv_0"]["bias"] = jnp.array([-0.45, -0.6, 0.35, -0.3])
    model = cs.adapt(net, v, input_shape=(6, 6, 1))
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    bright = rng.uniform(0.0, 0.8, (24, 1, 1, 1))  # each image's brightness decides which kernels fire
    x = np.clip(255 * (bright + rng.normal(0, 0.02, (24, 6, 6, 1))), 0, 255).astype(np.uint8)
    masks = {"Conv_0": np.array([[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 1, 1]], np.float32)}
    ms = ModuleSet(model, masks, None, {"normalization": {"mean": [0.0], "std": [1.0]}})
    coh, per = mwt.activation_cohesion(ms, x, y)
    xf = x / 255.0
    pre = jax.lax.conv_general_dilated(jnp.asarray(xf, jnp.float32), v["params"]["Conv_0"]["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + v["params"]["Conv_0"]["bias"]
    active = np.asarray(jax.nn.relu(pre).mean((1, 2)) > 0)
    want = []
    for c in range(3):
        sets = [set(np.flatnonzero(a & (masks["Conv_0"][c] > 0))) for a in active[y == c]]
        js = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2) if a | b]
        want.append(sum(js) / len(js))
    assert per == [pytest.approx(w, abs=1e-9) for w in want] and coh == pytest.approx(np.mean(want))
    assert 0.2 < min(want) < max(want) < 1.0  # the classes' images differ in the kernels they use


def test_modules_cohesion_coupling_and_retention_by_hand():
    # 6 samples, classes 0 0 0 1 1 1; layer A has 2 kernels, layer B 3
    labels = np.array([0, 0, 0, 1, 1, 1])
    a = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [0, 1]], bool)
    b = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 1]], bool)
    freqs = mwt.class_frequencies([a, b], labels, 2)
    np.testing.assert_allclose(freqs[0], [[1, 1 / 3], [0, 1]], rtol=1e-6)
    np.testing.assert_allclose(freqs[1], [[2 / 3, 0, 0], [0, 1 / 3, 1]], rtol=1e-6)
    masks, used = mwt.module_masks(freqs)
    # class 0, layer B: 2/3 < 0.9 ... the threshold falls by 0.05 until 2/3 >= it (0.65)
    np.testing.assert_array_equal(masks, [[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]])
    assert used[0, 1] == pytest.approx(0.65) and used[0, 0] == 0.9 and used[1].tolist() == [0.9, 0.9]
    assert mwt.kernel_retention(masks) == (pytest.approx(0.4), [0.4, 0.4])
    assert mwt.module_coupling(masks) == 0.0  # disjoint modules
    coh, per = mwt.module_cohesion([a, b], labels, masks)
    # class 0 restricted to kernels {A0, B0}: rows {A0,B0}, {A0,B0}, {A0}: shift 1: 1, 1/2, 1/2;
    # shift 2: 1/2, 1, 1/2 -> 2/3. class 1 on {A1, B2}: all rows {A1, B2} -> 1
    assert per == [pytest.approx(2 / 3), pytest.approx(1.0)] and coh == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match=r"classes \[2\] have no samples"):
        mwt.class_frequencies([a, b], labels, 3)


def test_sample_gates_mask_each_sample_from_its_layer_input():
    """The zoo's SimCNN with MwT's generators: conv_3 reads conv_2's unpooled output, so the
    masks recorded for conv_3 are the generator applied to conv_2's (gated) map; a closed
    generator zeroes its layer; generators that output exactly 1 leave the model unchanged."""
    from cnnsplit_jax.models import build_model

    model = build_model("simcnn", num_classes=4, in_channels=3, width=0.0625, key=1)
    params = mwt.init_generators(jax.random.key(2), model)
    assert list(params) == [f"conv_{i}" for i in range(1, 13)]  # conv_0 reads the image: no generator
    assert params["conv_3"]["w1"].shape == (model.spec("conv_2").out_channels, model.spec("conv_3").out_channels)
    x = jax.random.normal(jax.random.key(3), (3, 32, 32, 3))
    gates = mwt.sample_gates(params)
    maps = model.kernel_maps(x, gates)
    assert list(gates.masks) == list(params) and gates.masks["conv_3"].shape == (3, model.spec("conv_3").out_channels)
    np.testing.assert_allclose(np.asarray(gates.masks["conv_3"]), np.asarray(mwt.generator_mask(params["conv_3"], maps["conv_2"])),
                               rtol=1e-5, atol=1e-6)
    # the masks are per sample: two images get different masks
    masks3 = np.asarray(gates.masks["conv_3"])
    assert not np.allclose(masks3[0], masks3[1])
    closed = {**params, "conv_5": {**params["conv_5"], "b2": jnp.full_like(params["conv_5"]["b2"], -50.0),
                                   "w2": jnp.zeros_like(params["conv_5"]["w2"])}}
    shut = model.kernel_maps(x, mwt.sample_gates(closed))
    assert float(jnp.abs(shut["conv_5"]).max()) == 0.0 and float(jnp.abs(shut["conv_4"]).max()) > 0
    np.testing.assert_allclose(np.asarray(shut["conv_4"]), np.asarray(maps["conv_4"]), rtol=1e-6)
    opened = {k: {**v, "w2": jnp.zeros_like(v["w2"]), "b2": jnp.full_like(v["b2"], 50.0)} for k, v in params.items()}
    np.testing.assert_allclose(np.asarray(model(x, mwt.sample_gates(opened))), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown gated layer"):
        model(x, mwt.sample_gates({"conv_99": params["conv_3"]}))


def test_modular_loss_trains_generators_and_model_in_one_jitted_step():
    """MwT's loss through the zoo SimCNN with generators, jitted: its gradient reaches the model
    and every generator (finite, non-zero), and Nesterov SGD on the generators alone lowers the
    loss at every step, by pushing different-label masks apart (coupling falls)."""
    import optax
    from flax import nnx

    from cnnsplit_jax.models import build_model

    model = build_model("simcnn", num_classes=3, in_channels=3, width=0.125, key=4)
    graphdef, params = nnx.split(model)
    gens = mwt.init_generators(jax.random.key(5), model)
    x = jax.random.normal(jax.random.key(6), (12, 32, 32, 3)) + jnp.repeat(jnp.arange(3.0), 4)[:, None, None, None]
    y = jnp.repeat(jnp.arange(3), 4)
    loss_of = lambda p, g: mwt.modular_loss(nnx.merge(graphdef, p), g, x, y)  # noqa: E731
    (_, parts), (gp, gg) = jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True))(params, gens)
    for tree in (gp, gg):
        leaves = jax.tree.leaves(tree)
        assert all(np.isfinite(np.asarray(v)).all() for v in leaves) and any(float(jnp.abs(v).max()) > 0 for v in leaves)
    assert set(gg) == set(gens) and all(float(jnp.abs(gg[k]["w2"]).max()) > 0 for k in gg)
    tx = optax.sgd(0.05, momentum=0.9, nesterov=True)

    @jax.jit
    def step(g, opt):
        (loss, parts), grads = jax.value_and_grad(lambda g: loss_of(params, g), has_aux=True)(g)
        upd, opt = tx.update(grads, opt, g)
        return optax.apply_updates(g, upd), opt, loss, parts

    opt, losses, couplings = tx.init(gens), [], []
    for _ in range(20):
        gens, opt, loss, parts = step(gens, opt)
        losses.append(float(loss))
        couplings.append(float(parts["coupling"]))
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))
    assert couplings[-1] < couplings[0] - 0.005

