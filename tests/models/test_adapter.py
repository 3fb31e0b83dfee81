"""Bring your own model: a Linen CNN shaped like the Flax MNIST example (28x28, average
pooling) trained here with a plain optax loop, an NNX ResNet-18-style model at 64x64, both
adapted without rewriting them; the oracle for masking is the user's own model with the
dropped kernels' parameters zeroed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx, serialization

import cnnsplit_jax as cs
from cnnsplit_jax.compose import Pick, compose, predict_scores
from cnnsplit_jax.modules import ModuleSet


class MnistCNN(nn.Module):
    """The Flax MNIST example's CNN, narrower (8 / 16 channels, 32 hidden units)."""

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _digits28():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images, np.ones((3, 3)))  # 8x8 -> 24x24, then padded to 28x28
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None] * (255.0 / 16.0)
    return x.astype(np.uint8), d.target.astype(np.int64)


@pytest.fixture(scope="module")
def linen_mnist():
    """(module, trained variables, data splits) -- a plain optax loop, as a user would write."""
    x, y = _digits28()
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    tr, va, te = slice(0, 1200), slice(1200, 1500), slice(1500, None)
    xf = (x / 255.0 - 0.3) / 0.4
    m = MnistCNN()
    params = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(m.apply(p, xb), yb).mean()  # noqa: E731
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    for epoch in range(6):
        order = np.random.default_rng(epoch).permutation(1200)
        for i in range(0, 1200, 50):
            b = order[i:i + 50]
            params, opt = step(params, opt, jnp.asarray(xf[tr][b], jnp.float32), jnp.asarray(y[tr][b]))
    acc = float((np.asarray(m.apply(params, jnp.asarray(xf[te], jnp.float32))).argmax(1) == y[te]).mean())
    return m, params, (x[tr], y[tr], x[va], y[va], x[te], y[te]), acc


def test_adapted_linen_cnn_masks_equal_dropped_kernels(linen_mnist):
    m, params, data, acc = linen_mnist
    assert acc > 0.85  # measured 0.933 (Intel Xeon and AMD EPYC): a trained model, with margin
    model = cs.adapt(m, params, input_shape=(28, 28, 1))
    assert model.num_classes == 10 and model.arch == "adapted:MnistCNN"
    assert [(p.name, p.size) for p in model.mask_points()] == [("Conv_0", 8), ("Conv_1", 16)]
    x = jnp.asarray(((data[4][:16] / 255.0 - 0.3) / 0.4), jnp.float32)
    np.testing.assert_array_equal(model(x), m.apply(params, x))
    # the oracle: the user's model with kernels 1 and 5 of Conv_1 (weights and bias) zeroed
    dropped = jax.tree.map(lambda a: a, params)
    for leaf in ("kernel", "bias"):
        a = dropped["params"]["Conv_1"][leaf]
        dropped["params"]["Conv_1"][leaf] = a.at[..., jnp.array([1, 5])].set(0.0)
    masks = {"Conv_0": jnp.ones(8), "Conv_1": jnp.ones(16).at[jnp.array([1, 5])].set(0.0)}
    np.testing.assert_allclose(model(x, masks), m.apply(dropped, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expects images \[B, 28, 28, 1\]"):
        model(jnp.zeros((2, 32, 32, 1)))


def test_an_adapted_linen_cnn_trains_with_mwt_and_is_modularized(linen_mnist):
    """MwT on a user's Linen CNN: the adapter gates its second conv (the first reads the image)
    from that conv's input, at the conv's output before the user's ReLU, as the reference's
    MaskConvBN; ``fit`` trains the user's variables and the generator together; ``split``
    gives a module set that evaluates and extracts like any other."""
    from cnnsplit_jax.splitters import mwt
    from cnnsplit_jax.train import RECIPES

    m, params, (xtr, ytr, xva, yva, xte, yte), _ = linen_mnist
    model = cs.adapt(m, params, input_shape=(28, 28, 1))
    assert model.gate_layers() == (("Conv_1", 8, 16),)
    # the gated forward, by hand: Conv_1's output times the generator's mask of Conv_1's input
    gens = mwt.init_generators(jax.random.key(3), model)
    x = jnp.asarray((xte[:6] / 255.0 - 0.3) / 0.4, jnp.float32)
    gates = mwt.sample_gates(gens)
    got = model(x, gates)
    p = params["params"]
    h0 = nn.avg_pool(nn.relu(jax.lax.conv_general_dilated(x, p["Conv_0"]["kernel"], (1, 1), "SAME",
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
                             + p["Conv_0"]["bias"]), (2, 2), (2, 2))
    c1 = jax.lax.conv_general_dilated(h0, p["Conv_1"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["Conv_1"]["bias"]
    mask = mwt.generator_mask(gens["Conv_1"], h0)
    h1 = nn.avg_pool(nn.relu(c1 * mask[:, None, None, :]), (2, 2), (2, 2))
    h = nn.relu(h1.reshape(6, -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    np.testing.assert_allclose(got, h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gates.masks["Conv_1"], mask, rtol=1e-6)
    # modular training of the user's variables and the generator
    info = cs.DatasetInfo("digits28", tuple(str(i) for i in range(10)), 1, (0.3,), (0.4,))
    ds = cs.Dataset(xtr, ytr, xte, yte, info)
    cfg = cs.TrainConfig(**{**RECIPES["mwt-quick"], "epochs": 2, "batch_size": 64, "lr": 0.02})
    res = cs.fit(model, ds, cfg, objective=cs.MwTObjective())
    assert set(res.extra) == {"Conv_1"} and np.isfinite(res.history[-1]["train_coupling"])
    assert not np.allclose(res.model.layer_arrays("Conv_1")["kernel"], p["Conv_1"]["kernel"])  # the user's weights trained
    data = cs.SplitData(xtr, ytr, xva, yva, (0.3,), (0.4,))
    sp = mwt.split(jax.random.key(0), res.model, data, cs.MwTSplitConfig(), generators=res.extra)
    ms = sp.module_set
    np.testing.assert_array_equal(ms.masks["Conv_0"], 1.0)
    _, (b,), _ = mwt.record_masks(res.model, res.extra, xtr, ((0.3,), (0.4,)))
    for c in range(10):  # the frequency rule, written out (0.9, lowered in 0.05 steps)
        f, t = b[ytr == c].mean(0), 0.9
        while not (f >= t - 1e-6).any():
            t -= 0.05
        np.testing.assert_array_equal(ms.masks["Conv_1"][c] > 0, f >= t - 1e-6)
    assert "module_flops" in ms.structure()  # the modules of a conv chain extract physically


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        h = nn.relu(nn.Conv(6, (3, 3))(h))
        return nn.Dense(3)(h.mean((1, 2)))


def test_an_adapted_nnx_cnn_with_batchnorm_trains_as_in_its_own_train_mode():
    """``train=True`` on an adapted NNX model runs its BatchNorm layers as the model's own
    ``train()`` mode: the same logits and the same updated running averages as the user's model
    called in that mode; the layers are back in eval mode after the call; MwT trains it. A Linen
    model with BatchNorm adapted without ``train_kwargs`` is refused (its train flag is the
    user's call argument; test_adapter_training.py trains one adapted with them)."""
    chain = ChainBN(nnx.Rngs(0))
    chain.eval()
    mine = nnx.clone(chain)
    mine.train()  # the user's own training mode
    model = cs.adapt(chain, None, input_shape=(8, 8, 3), num_classes=4)
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3)) * 2 + 0.5
    np.testing.assert_allclose(model(x, train=True), mine(x), rtol=1e-5, atol=1e-5)
    for name in ("b1", "b2"):
        ours, theirs = getattr(model.net, name), getattr(mine, name)
        np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-6)
        assert np.abs(np.asarray(ours.mean[...])).max() > 1e-3 and ours.use_running_average  # moved; eval again
    mine.eval()
    np.testing.assert_allclose(model(x), mine(x), rtol=1e-5, atol=1e-5)
    # MwT through fit: the generator of c2 and the user's variables train, the running averages move
    from cnnsplit_jax.splitters import mwt
    from cnnsplit_jax.train import RECIPES

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 256)
    imgs = np.clip(rng.normal(60 + 40 * y[:, None, None, None], 30, (256, 8, 8, 3)), 0, 255).astype(np.uint8)
    info = cs.DatasetInfo("bars", ("a", "b", "c", "d"), 3, (0.5,) * 3, (0.25,) * 3)
    ds = cs.Dataset(imgs[:192], y[:192].astype(np.int32), imgs[192:], y[192:].astype(np.int32), info)
    before = np.asarray(model.net.b2.mean[...]).copy()
    cfg = cs.TrainConfig(**{**RECIPES["mwt-quick"], "epochs": 2, "batch_size": 32, "augment": False})
    res = cs.fit(model, ds, cfg, objective=cs.MwTObjective())
    assert set(res.extra) == set(mwt.generator_layers(model)) == {"c2"}
    assert np.isfinite(res.history[-1]["train_coupling"])
    assert not np.allclose(np.asarray(res.model.net.b2.mean[...]), before)
    assert res.model.net.b2.use_running_average  # the trained model evaluates in eval mode
    with pytest.raises(ValueError, match="Linen model with BatchNorm"):
        m = LinenBN()
        v = m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
        cs.adapt(m, v, input_shape=(8, 8, 3))(jnp.zeros((1, 8, 8, 3)), train=True)


def test_gradsplitter_and_cnnsplitter_decompose_an_adapted_linen_cnn(linen_mnist):
    m, params, (xtr, ytr, xva, yva, xte, yte), acc = linen_mnist
    model = cs.adapt(m, params, input_shape=(28, 28, 1))
    data = cs.SplitData(xtr, ytr, xva, yva, (0.3,), (0.4,))
    cfg = cs.GradSplitterConfig(head_epochs=1, modularity_epochs=6, cycle_mod=2, cycle_head=1,
                                lr_modularity=0.05, batch_size=100)
    res = cs.gradsplitter.split(jax.random.key(0), model, data, cfg)
    ms = res.module_set
    st = ms.structure()
    assert st["mean_kernel_retention"] < 0.95  # modules keep fewer kernels
    # FLOPs by hand: conv 28x28 x (3x3x1x8), conv 14x14 x (3x3x8x16), dense 784x32, dense 32x10
    assert st["base_flops"] == 2 * (28 * 28 * 72 + 14 * 14 * 1152 + 784 * 32 + 32 * 10)
    assert max(st["module_flops_ratio"]) <= 1.0 and min(st["module_flops_ratio"]) < 1.0
    k0, k1 = (int(cs.models.effective_masks(ms.masks)[n][3].sum()) for n in ("Conv_0", "Conv_1"))
    assert st["module_flops"][3] == 2 * (28 * 28 * 9 * k0 + 14 * 14 * 9 * k0 * k1 + 49 * k1 * 32 + 32 * 10)
    comp = compose([Pick(ms, c) for c in range(10)])
    composed = float((predict_scores(comp, xte).argmax(1) == yte).mean())
    assert composed > acc - 0.05  # measured: base 0.933, composed 0.943 at kernel retention 0.85
    # the composition of the physically smaller modules gives the masked composition's scores
    small = predict_scores(compose([Pick(ms, c) for c in range(10)], form="extracted"), xte[:100])
    np.testing.assert_allclose(small, predict_scores(comp, xte[:100]), rtol=1e-4, atol=1e-5)
    # a chain of convs: module 3 extracted is physically smaller and equals its masked forward
    from cnnsplit_jax.models import effective_masks
    from cnnsplit_jax.modules.extract_adapted import extract_adapted

    eff = effective_masks({k: v[3] for k, v in ms.masks.items()})
    mod = extract_adapted(model, eff)
    assert {k: len(v) for k, v in mod.kept} == {k: int(v.sum()) for k, v in eff.items()}
    assert mod.params["Conv_1"]["kernel"].shape == (3, 3, int(eff["Conv_0"].sum()), int(eff["Conv_1"].sum()))
    assert mod.num_params() < cs.count_params(model)
    xn = jnp.asarray((xte[:64] / 255.0 - 0.3) / 0.4, jnp.float32)
    np.testing.assert_allclose(mod(xn), model(xn, {k: jnp.asarray(v) for k, v in eff.items()}), rtol=1e-4, atol=1e-4)
    gcfg = cs.CNNSplitterConfig(population=6, generations=2, num_parents=4, keep_parents=2, groups=4,
                                thresholds=((2, 0.0), (4, 0.0), (6, 0.0), (8, 0.0), (10, 0.0)), min_keep=2, max_keep=4,
                                sensitivity_images=60, eval_images=60)
    ga = cs.cnnsplitter.split(jax.random.key(1), model, data, gcfg).module_set
    kept = np.asarray(cs.kept_kernels(model, ga.masks))
    assert kept.shape == (10,) and (kept < 24).any() and (kept > 0).all()


class Block(nnx.Module):
    def __init__(self, cin, cout, stride, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.proj = (nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
                     if stride != 1 or cin != cout else None)
        self.bnp = nnx.BatchNorm(cout, rngs=rngs) if self.proj is not None else None

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        short = x if self.proj is None else self.bnp(self.proj(x))
        return nnx.relu(h + short)


class ResNet18(nnx.Module):
    """ResNet-18 layout (2 blocks per stage, strided convs, projection shortcuts), narrow."""

    def __init__(self, rngs, widths=(4, 8, 8, 16), classes=5):
        self.stem = nnx.Conv(3, widths[0], (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(widths[0], rngs=rngs)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(Block(cin, w, 2 if i > 0 and j == 0 else 1, rngs))
                cin = w
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(cin, classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            h = b(h)
        return self.fc(h.mean((1, 2)))


def _resnet18():
    net = ResNet18(nnx.Rngs(0))
    # non-trivial BN statistics, so that masking before the BN would differ from dropping
    for path, bn in nnx.iter_modules(net):
        if isinstance(bn, nnx.BatchNorm):
            c = bn.mean.shape
            bn.mean[...] = jax.random.normal(jax.random.key(len(path)), c) * 0.1
            bn.bias[...] = jax.random.normal(jax.random.key(len(path) + 7), c) * 0.1
    net.eval()
    return net


def test_nnx_resnet18_at_64px_points_ties_and_a_gradsplitter_step():
    net = _resnet18()
    model = cs.adapt(net, input_shape=(64, 64, 3), ties="none")
    pts = {p.name: p for p in model.mask_points()}
    # stem + 8 blocks x 2 convs + 3 projections, each masked at the BatchNorm reading it
    assert len(pts) == 1 + 16 + 3 and model.num_classes == 5
    assert pts["blocks/2/proj"].size == 8 and model._where["blocks/2/bnp"] == "blocks/2/proj"
    assert {s.stride for s in model.topology if s.name.endswith("proj")} == {2}
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    np.testing.assert_array_equal(model(x), net(x))
    # masking a channel == the user's model with that channel's BN output forced to 0
    masks = {k: jnp.ones(p.size) for k, p in pts.items()}
    masks["blocks/0/conv1"] = masks["blocks/0/conv1"].at[2].set(0.0)
    bn = net.blocks[0].bn1
    scale, bias = bn.scale[...], bn.bias[...]
    bn.scale[...], bn.bias[...] = scale.at[2].set(0.0), bias.at[2].set(0.0)
    want = net(x)
    bn.scale[...], bn.bias[...] = scale, bias
    np.testing.assert_allclose(model(x, masks), want, rtol=1e-5, atol=1e-5)
    # declared residual ties: a block's conv2 shares its shortcut projection's mask
    tied = cs.adapt(net, input_shape=(64, 64, 3), ties=[("blocks/2/proj", "blocks/2/conv2")])
    tp = {p.name: p for p in tied.mask_points()}
    assert tp["blocks/2/proj"].layers == ("blocks/2/conv2", "blocks/2/proj") and "blocks/2/conv2" not in tp
    assert cs.total_kernels(tied) == cs.total_kernels(model)
    # one GradSplitter modularity step moves the masks; all-ones modules reproduce the model
    from cnnsplit_jax.splitters.gradsplitter import init, modularity_step

    gcfg = cs.GradSplitterConfig(init="ones", alpha=1.0)
    state = init(jax.random.key(0), model, gcfg)
    before = jax.tree.map(np.asarray, state.masks)
    state = state._replace(opt_state=state.opt_state._replace(hyperparams={
        **state.opt_state.hyperparams, "learning_rate": jnp.float32(0.1)}))
    state, _ = modularity_step(model, gcfg, state, x, jnp.array([0, 3]))
    assert any(not np.array_equal(before[k], np.asarray(v)) for k, v in state.masks.items())
    ms = ModuleSet(model, {k: np.ones((5, p.size), np.float32) for k, p in pts.items()}, None,
                   {"normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    comp = compose([Pick(ms, c) for c in range(5)], input="normalized")
    np.testing.assert_allclose(cs.apply(comp, x), net(x), rtol=1e-5, atol=1e-5)


def test_adapted_and_zoo_modules_compose_in_one_apply(linen_mnist):
    m, params, _, _ = linen_mnist

    class Linen32(nn.Module):  # the same layout at the zoo's 32x32
        @nn.compact
        def __call__(self, x):
            return MnistCNN()(x)

    mod = Linen32()
    v = mod.init(jax.random.key(3), jnp.zeros((1, 32, 32, 1)))
    adapted = cs.adapt(mod, v, input_shape=(32, 32, 1))
    zoo = cs.build_model("simcnn", num_classes=10, in_channels=1, width=0.0625, key=2)
    norm = {"normalization": {"mean": [0.3], "std": [0.4]}}
    rng = np.random.default_rng(0)
    a = ModuleSet(adapted, {p.name: (rng.random((10, p.size)) > 0.3).astype(np.float32)
                            for p in adapted.mask_points()}, None, dict(norm))
    z = ModuleSet(zoo, {p.name: np.ones((10, p.size), np.float32) for p in cs.mask_points(zoo)}, None, dict(norm))
    x = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    both = predict_scores(compose([Pick(a, 4), Pick(z, 7)]), x)
    alone_a = predict_scores(compose([Pick(a, 4), Pick(a, 7)]), x)
    alone_z = predict_scores(compose([Pick(z, 4), Pick(z, 7)]), x)
    np.testing.assert_allclose(both[:, 0], alone_a[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[:, 1], alone_z[:, 1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different image shapes"):
        compose([Pick(z, 0), Pick(ModuleSet(cs.adapt(m, params, input_shape=(28, 28, 1)), {
            p: np.ones((10, s), np.float32) for p, s in (("Conv_0", 8), ("Conv_1", 16))}, None, dict(norm)), 1)])


def test_adapter_errors_are_specific():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    v = Mlp().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(cs.AdapterError, match="no conv layer"):
        cs.adapt(Mlp(), v, input_shape=(8, 8, 1))
    m = MnistCNN()
    v = m.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(cs.AdapterError, match=r"not this model's \(other shapes: .*Dense_0.*\(the model has "
                                              r"\(1024, 32\)\)\); pass .* the input_shape \(32, 32, 1\)"):
        cs.adapt(m, v, input_shape=(32, 32, 1))  # the Dense layer was built for 28x28
    with pytest.raises(cs.AdapterError, match="num_classes=5 but the model's logits have 10"):
        cs.adapt(m, v, input_shape=(28, 28, 1), num_classes=5)
    with pytest.raises(cs.AdapterError, match=r"no conv layer at path\(s\) \['Conv_9'\].*Conv_0"):
        cs.adapt(m, v, input_shape=(28, 28, 1), mask_points=["Conv_9"])
    with pytest.raises(cs.AdapterError, match="Linen module with its variables"):
        cs.adapt(m, None, input_shape=(28, 28, 1))
    # a Linen class with default fields is its own definition; an NNX model needs one to be saved
    assert cs.adapt(m, v, input_shape=(28, 28, 1)).definition == "test_adapter:MnistCNN"
    net = ChainBN(nnx.Rngs(0))
    net.eval()
    with pytest.raises(cs.CheckpointError, match="without its definition: pass definition="):
        cs.save_model("/tmp/never-written", cs.adapt(net, input_shape=(20, 20, 3)))
    with pytest.raises(cs.AdapterError, match="is 'package.module:name'"):
        cs.adapt(net, input_shape=(20, 20, 3), definition="ChainBN")
    with pytest.raises(cs.AdapterError, match="cannot import the model definition 'test_adapter:Nope'"):
        cs.adapt(net, input_shape=(20, 20, 3), definition="test_adapter:Nope")


def test_load_variables_from_msgpack_and_orbax(tmp_path):
    m = MnistCNN()
    trained = m.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
    fresh = m.init(jax.random.key(2), jnp.zeros((1, 28, 28, 1)))
    (tmp_path / "v.msgpack").write_bytes(serialization.to_bytes(trained))
    got = cs.load_variables(tmp_path / "v.msgpack", fresh)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(a, b)
    import orbax.checkpoint as ocp

    ocp.v1.save(tmp_path / "orbax", trained)
    got = cs.load_variables(tmp_path / "orbax", fresh)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(a, b)
    # an NNX model: its state's pure dict, restored into a fresh instance in place
    net, other = _resnet18(), ResNet18(nnx.Rngs(9))
    other.eval()
    (tmp_path / "net.msgpack").write_bytes(serialization.to_bytes(nnx.state(net).to_pure_dict()))
    cs.load_variables(tmp_path / "net.msgpack", other)
    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    np.testing.assert_array_equal(other(x), net(x))
    with pytest.raises(cs.AdapterError, match="structure"):
        cs.load_variables(tmp_path / "v.msgpack", other)
    with pytest.raises(cs.AdapterError, match="no checkpoint"):
        cs.load_variables(tmp_path / "missing", fresh)


class ChainBN(nnx.Module):
    """conv-BN-relu, strided conv-BN-relu (padding 1), global mean, linear."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.b1 = nnx.BatchNorm(6, rngs=rngs)
        self.c2 = nnx.Conv(6, 10, (3, 3), strides=2, padding=1, rngs=rngs)
        self.b2 = nnx.BatchNorm(10, rngs=rngs)
        self.fc = nnx.Linear(10, 4, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.b1(self.c1(x)))
        h = nnx.relu(self.b2(self.c2(h)))
        return self.fc(h.mean((1, 2)))


def test_extraction_of_an_nnx_chain_slices_batchnorm_and_refuses_residual_graphs():
    from cnnsplit_jax.modules.extract_adapted import ExtractionError, extract_adapted

    net = ChainBN(nnx.Rngs(0))
    for bn in (net.b1, net.b2):
        bn.mean[...] = jax.random.normal(jax.random.key(1), bn.mean.shape) * 0.3
        bn.var[...] = jax.random.uniform(jax.random.key(2), bn.var.shape, minval=0.5, maxval=2.0)
    net.eval()
    model = cs.adapt(net, input_shape=(20, 20, 3))
    masks = {"c1": np.array([1, 0, 1, 1, 0, 1], np.float32), "c2": np.zeros(10, np.float32)}
    mod = extract_adapted(model, masks)  # c2 keeps one kernel (the keep-one rule)
    assert mod.params["c2"]["kernel"].shape == (3, 3, 4, 1) and mod.params["b2"]["var"].shape == (1,)
    assert mod.params["fc"]["kernel"].shape == (1, 4)
    x = jax.random.normal(jax.random.key(3), (3, 20, 20, 3))
    want = model(x, {"c1": jnp.asarray(masks["c1"]), "c2": jnp.zeros(10).at[0].set(1.0)})
    np.testing.assert_allclose(mod(x), want, rtol=1e-5, atol=1e-5)
    # a residual graph whose added convs keep their own masks cannot be sliced
    res = cs.adapt(_resnet18(), input_shape=(64, 64, 3), ties="none")
    with pytest.raises(ExtractionError, match="not tied; adapt the model with ties='auto'"):
        extract_adapted(res, {p.name: np.ones(p.size) for p in res.mask_points()})


def test_concern_identification_on_an_adapted_nnx_resnet18():
    from cnnsplit_jax.data import normalize
    from cnnsplit_jax.splitters import concern

    net = _resnet18()
    model = cs.adapt(net, input_shape=(64, 64, 3), kind="node")
    nodes = {n.name: n for n in model.nodes()}
    # every conv output after its BN: the paper's mapping (a block's branches before its Add)
    assert len(nodes) == 20 and nodes["stem"].shape == (64, 64, 4) and nodes["blocks/7/conv2"].shape == (8, 8, 16)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    y = np.arange(20) % 5
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    xf = jnp.asarray(normalize(imgs, mean, std))
    np.testing.assert_allclose(model.fc(model.node_forward(xf)), net(xf), rtol=1e-5, atol=1e-5)
    cfg = concern.ConcernConfig(min_confidence=None, bln_rule="relative")
    d = concern.decompose(model, imgs, y, mean, std, cfg)
    # the oracle: the user's own stem and BN called directly
    concerned, _ = concern.sample_sets(y, 5, cfg, jax.random.key(cfg.seed))
    for c in range(5):
        pre = np.asarray(net.bn(net.stem(xf[concerned[c]])))
        np.testing.assert_array_equal(d.ci_inactive["stem"][c], (pre <= 0).all(0))
    # MC-BLN removes features from the channeled head (the pooling is the user's code)
    assert d.removed_features.any() and (d.head_w[d.removed_features] == 0).all()
    ms = concern.split(jax.random.key(0), model, cs.SplitData(imgs, y, imgs[:5], y[:5], mean, std), cfg).module_set
    assert ms.set_kind == "concern" and ms.num_modules == 5
    assert predict_scores(compose([Pick(ms, c) for c in range(5)]), imgs).shape == (20, 5)
    with pytest.raises(cs.models.ModelCapabilityError, match=r"MC-BI \(backtrack='bi'\) needs a model with a "
                       r"declared layer graph; adapted:\w+ has a user's definition and position nodes"):
        concern.decompose(model, imgs, y, mean, std, concern.ConcernConfig(min_confidence=None, backtrack="bi"))
    with pytest.raises(cs.AdapterError, match="never tied"):
        cs.adapt(net, input_shape=(64, 64, 3), kind="node", ties=[("blocks/2/proj", "blocks/2/conv2")])
