"""Residual ties discovered from the traced graph, and the zoo seen through the same adapter.

Oracles: the tie groups are enumerated by hand from each architecture's definition (which
block has a projection, which an identity shortcut); masking a tied group equals the user's
own model with that channel's BatchNorm scale and bias zeroed in every tied layer; the zoo's
hand-declared topology (ResCNN's three tied pairs) and its own masked forward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_adapter import _resnet18

import cnnsplit_jax as cs
from cnnsplit_jax.splitters.gradsplitter import init, modularity_step


def test_residual_ties_of_an_nnx_resnet18_are_discovered_and_gate_every_tied_layer():
    net = _resnet18()
    model = cs.adapt(net, input_shape=(64, 64, 3))
    got = {p.name: set(p.layers) for p in model.mask_points()}
    # by hand: stage 1 (blocks 0, 1) has identity shortcuts, so both conv2 add the stem's output;
    # stages 2-4 open with a projection (blocks 2, 4, 6) whose output the next block adds again
    want = {"stem": {"stem", "blocks/0/conv2", "blocks/1/conv2"}}
    for first in (2, 4, 6):
        want[f"blocks/{first}/conv2"] = {f"blocks/{first}/conv2", f"blocks/{first}/proj", f"blocks/{first + 1}/conv2"}
    want.update({f"blocks/{b}/conv1": {f"blocks/{b}/conv1"} for b in range(8)})
    assert got == want
    assert len(cs.adapt(net, input_shape=(64, 64, 3), ties="none").mask_points()) == 20
    assert cs.total_kernels(model) == 4 + 4 * 4 + 2 * 5 * 8 + 5 * 16  # every conv once (4 per stage + projections)
    # dropping channel 1 of the stage-2 group == zeroing that channel's BN output in its three layers
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    masks = {p.name: jnp.ones(p.size) for p in model.mask_points()}
    masks["blocks/2/conv2"] = masks["blocks/2/conv2"].at[1].set(0.0)
    bns = [net.blocks[2].bn2, net.blocks[2].bnp, net.blocks[3].bn2]
    saved = [(bn.scale[...], bn.bias[...]) for bn in bns]
    for bn, (s, b) in zip(bns, saved):
        bn.scale[...], bn.bias[...] = s.at[1].set(0.0), b.at[1].set(0.0)
    want_out = net(x)
    for bn, (s, b) in zip(bns, saved):
        bn.scale[...], bn.bias[...] = s, b
    np.testing.assert_allclose(model(x, masks), want_out, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(x, masks), net(x), atol=1e-3)


class Mixed(nn.Module):
    """Linen: an identity residual without norm, a squeeze-excite gate (a product with a
    dense layer's output: not a tie), a pooled shortcut (ties through the pooling) and a
    channel concat (new channels: no tie)."""

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(6, (3, 3), name="a")(x))
        b = nn.Conv(6, (3, 3), name="b")(a)
        h = nn.relu(b + a)                                        # ties a, b
        g = nn.sigmoid(nn.Dense(6, name="se")(h.mean((1, 2))))
        h = h * g[:, None, None, :]                               # gate: no tie
        p = nn.max_pool(h, (2, 2), (2, 2))
        c = nn.Conv(6, (3, 3), name="c")(p)
        h = nn.relu(c + p)                                        # ties c with a, b (through the pool)
        d = nn.relu(nn.Conv(4, (1, 1), name="d")(h))
        e = nn.relu(nn.Conv(4, (3, 3), name="e")(h))
        h = jnp.concatenate([d, e], -1)                          # new channels: no tie
        f = nn.relu(nn.Conv(8, (3, 3), name="f")(h))
        return nn.Dense(3, name="out")(f.mean((1, 2)))


def test_ties_follow_pooling_and_ignore_gates_and_channel_concats():
    m = Mixed()
    v = m.init(jax.random.key(0), jnp.zeros((1, 12, 12, 2)))
    model = cs.adapt(m, v, input_shape=(12, 12, 2))
    assert [p.layers for p in model.mask_points()] == [("a", "b", "c"), ("d",), ("e",), ("f",)]
    x = jax.random.normal(jax.random.key(2), (3, 12, 12, 2))
    np.testing.assert_allclose(model(x), m.apply(v, x), rtol=1e-6, atol=1e-6)
    # declared ties replace the discovery; a restricted set of points is tied within itself
    assert [p.layers for p in cs.adapt(m, v, input_shape=(12, 12, 2), ties=[("d", "e")]).mask_points()] == [
        ("a",), ("b",), ("c",), ("d", "e"), ("f",)]
    assert [p.layers for p in cs.adapt(m, v, input_shape=(12, 12, 2), mask_points=["b", "c", "f"]).mask_points()] \
        == [("b", "c"), ("f",)]
    with pytest.raises(cs.AdapterError, match="'auto', 'none'"):
        cs.adapt(m, v, input_shape=(12, 12, 2), ties="all")


def test_every_kernel_mask_architecture_of_the_zoo_adapts_to_its_declared_points():
    kernel_archs = sorted(a for a, cls in cs.ARCHITECTURES.items() if cls.mask_kind == "kernel")
    assert len(kernel_archs) == 11  # with the two SVHN weak models and MwT's VGG16-BN and ResNet-18
    for arch in set(kernel_archs) - {"simcnn", "rescnn", "incecnn"}:  # those three: the test below
        zoo = cs.build_model(arch, num_classes=4, in_channels=1, width=0.0625, key=1)
        got = [(p.name, p.size, p.layers) for p in cs.adapt(zoo, input_shape=(32, 32, 1)).mask_points()]
        assert got == [(p.name, p.size, p.layers) for p in cs.mask_points(zoo)], arch


@pytest.mark.parametrize("arch", ["simcnn", "rescnn", "incecnn"])
def test_the_zoo_through_the_adapter_equals_its_declared_topology(arch):
    zoo = cs.build_model(arch, num_classes=10, in_channels=3, width=0.0625, key=0)
    model = cs.adapt(zoo, input_shape=(32, 32, 3))
    # the same mask points (ResCNN's three shortcut pairs discovered), kernel sizes and strides
    assert [(p.name, p.size, p.layers) for p in model.mask_points()] == [
        (p.name, p.size, p.layers) for p in cs.mask_points(zoo)]
    if arch == "rescnn":
        assert [p.layers for p in model.mask_points() if len(p.layers) > 1] == [
            ("conv_1", "conv_3"), ("conv_5", "conv_7"), ("conv_9", "conv_11")]
    zoo_specs = {s.name: (s.ksize, s.out_channels, s.stride) for s in zoo.topology}
    assert {s.name: (s.ksize, s.out_channels, s.stride) for s in model.topology} == zoo_specs
    assert cs.total_kernels(model) == cs.total_kernels(zoo)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    rng = np.random.default_rng(0)
    masks = {p.name: jnp.asarray((rng.random(p.size) > 0.4).astype(np.float32)) for p in model.mask_points()}
    np.testing.assert_allclose(model(x, masks), zoo(x, masks), rtol=1e-5, atol=1e-5)
    if arch != "rescnn":
        return
    # the splitter's step cannot tell them apart (the tied model; each step compiles for ~8 s)
    cfg = cs.GradSplitterConfig(alpha=0.5)
    y = jnp.arange(4) % 10
    out_z = modularity_step(zoo, cfg, init(jax.random.key(3), zoo, cfg), x, y)
    out_a = modularity_step(model, cfg, init(jax.random.key(3), model, cfg), x, y)
    for k in out_z[0].masks:
        np.testing.assert_allclose(out_a[0].masks[k], out_z[0].masks[k], rtol=1e-5, atol=1e-6)
    for a, z in zip(jax.tree.leaves(out_a[1]), jax.tree.leaves(out_z[1])):
        np.testing.assert_allclose(a, z, rtol=1e-4, atol=1e-5)


def test_a_resnet18_module_is_physically_smaller_and_equals_the_model_with_dropped_channels():
    from flax import nnx

    from cnnsplit_jax.modules.extract_adapted import extract_adapted

    net = _resnet18()
    model = cs.adapt(net, input_shape=(64, 64, 3))
    rng = np.random.default_rng(5)
    masks = {p.name: (rng.random(p.size) > 0.5).astype(np.float32) for p in model.mask_points()}
    for m in masks.values():
        m[0] = 1.0  # at least one kernel kept (the keep-one rule is tested elsewhere)
    mod = extract_adapted(model, masks)
    keep = {p.name: int(masks[p.name].sum()) for p in model.mask_points()}
    # a projection reads the stage before's group and writes its own; the head reads the last group
    assert mod.params["blocks/2/proj"]["kernel"].shape == (1, 1, keep["stem"], keep["blocks/2/conv2"])
    assert mod.params["blocks/3/conv1"]["kernel"].shape == (3, 3, keep["blocks/2/conv2"], keep["blocks/3/conv1"])
    assert mod.params["fc"]["kernel"].shape == (keep["blocks/6/conv2"], 5)
    assert mod.num_params() < sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(net, nnx.Param)))
    # oracle: the user's own model with each dropped channel's BatchNorm scale and bias zeroed
    oracle = nnx.clone(net)
    bn_of = {c: c.replace("conv", "bn").replace("proj", "bnp") for p in model.mask_points() for c in p.layers}
    bn_of["stem"] = "bn"
    layers = dict(("/".join(map(str, k)), v) for k, v in nnx.iter_modules(oracle))
    for p in model.mask_points():
        for conv in p.layers:
            bn = layers[bn_of[conv]]
            bn.scale[...] = bn.scale[...] * masks[p.name]
            bn.bias[...] = bn.bias[...] * masks[p.name]
    x = jax.random.normal(jax.random.key(7), (3, 64, 64, 3))
    np.testing.assert_allclose(mod(x), oracle(x), rtol=1e-4, atol=1e-4)


def test_a_module_set_of_an_adapted_nnx_model_is_saved_and_loaded_with_its_definition(tmp_path):
    from cnnsplit_jax.modules import ModuleSet, load_module_set, save_module_set

    net = _resnet18()
    net.blocks[3].bn2.scale[...] = net.blocks[3].bn2.scale[...] * 1.7  # trained weights the definition lacks
    model = cs.adapt(net, input_shape=(64, 64, 3), definition="test_adapter:_resnet18")
    rng = np.random.default_rng(2)
    masks = {p.name: (rng.random((5, p.size)) > 0.4).astype(np.float32) for p in model.mask_points()}
    ms = ModuleSet(model, masks, None, {"normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    save_module_set(tmp_path / "mods", ms)
    back = load_module_set(tmp_path / "mods", trust_definition=True)
    assert [(p.name, p.layers) for p in back.base.mask_points()] == [(p.name, p.layers) for p in model.mask_points()]
    x = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
    np.testing.assert_allclose(back.base(x), net(x), rtol=1e-6, atol=1e-6)  # the saved weights, not the definition's
    assert not np.allclose(back.base(x), _resnet18()(x), atol=1e-4)
    for k in masks:
        np.testing.assert_array_equal(np.asarray(back.masks[k]), masks[k])
    # a definition that no longer has the saved layers is refused when loading
    meta = json.loads((tmp_path / "mods" / "base" / "model.json").read_text())
    meta["adapted"]["points"][0][1] = ["stem", "blocks/9/conv2"]
    (tmp_path / "mods" / "base" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(cs.CheckpointError, match=r"cannot rebuild the adapted model .* no conv layer at path"):
        load_module_set(tmp_path / "mods", trust_definition=True)
