"""Users' models are masked correctly or refused: a pre-activation residual net (flax-cifar's
WideResNet layout, conv -> add -> BN -> ReLU) gets mask points that drop their kernels, checked
against the user's own model with those weights zeroed; concern identification refuses nodes
that are not ReLU inputs; a Linen ResNet with a list field (Flax's ImageNet example) runs it;
the common Flax mistakes are named with what to pass."""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import cnnsplit_jax as cs
from cnnsplit_jax.models.adapter_checks import failing_points


class PreActBlock(nn.Module):
    """A pre-activation block: BN -> ReLU -> conv, twice; the identity (or a projection of
    the activated input) is added to the second conv's raw output."""

    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        if self.stride != 1 or x.shape[-1] != self.channels:
            short = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=False)(y)
        else:
            short = x
        y = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), use_bias=False)(y)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        return short + nn.Conv(self.channels, (3, 3), use_bias=False)(y)


class PreActWRN(nn.Module):
    """A narrow WideResNet as flax-cifar writes it: stem conv, pre-activation blocks, BN-ReLU,
    global average pooling, dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = PreActBlock(8)(x, train)
        x = PreActBlock(8)(x, train)
        x = PreActBlock(16, 2)(x, train)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10)(x.mean((1, 2)))


def _trained_like(variables, seed=0):
    """Random non-trivial weights and BatchNorm statistics (a trained model's are not identities)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    out = []
    for i, (path, v) in enumerate(leaves):
        key = jax.random.key(seed * 1000 + i)
        name = jax.tree_util.keystr(path)
        if "var" in name:
            out.append(jax.random.uniform(key, v.shape, minval=0.5, maxval=2.0))
        elif "scale" in name:
            out.append(1.0 + 0.3 * jax.random.normal(key, v.shape))
        elif "mean" in name or "bias" in name:
            out.append(0.2 * jax.random.normal(key, v.shape))
        else:
            out.append(v)
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.fixture(scope="module")
def wrn():
    m = PreActWRN()
    variables = _trained_like(m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1))))
    return m, variables


def _zeroed(variables, model, point, c):
    """The user's variables with kernel ``c`` of every conv of ``point`` zeroed, and the
    BatchNorm channel a point lying after a norm covers (the oracle: weights removed for real)."""
    v = jax.tree.map(lambda a: a, variables)
    p = next(q for q in model.mask_points() if q.name == point)
    for conv in p.layers:
        layer = v["params"]
        for part in conv.split("/"):
            layer = layer[part]
        layer["kernel"] = layer["kernel"].at[..., c].set(0.0)
        if "bias" in layer:
            layer["bias"] = layer["bias"].at[c].set(0.0)
        at = model.placement_layer(conv)
        if at != conv:
            norm = v["params"]
            for part in at.split("/"):
                norm = norm[part]
            norm["scale"], norm["bias"] = norm["scale"].at[c].set(0.0), norm["bias"].at[c].set(0.0)
    return v


def test_a_preactivation_net_gets_points_that_drop_their_kernels(wrn):
    m, variables = wrn
    model = cs.adapt(m, variables, input_shape=(16, 16, 1))
    pts = {p.name: p.layers for p in model.mask_points()}
    # the stem's raw output feeds the first block's BN *and* its identity shortcut: its mask moves
    # to the conv's output, where it is added to the blocks' second convs, so they are tied
    assert pts["Conv_0"] == ("Conv_0", "PreActBlock_0/Conv_1", "PreActBlock_1/Conv_1")
    assert pts["PreActBlock_2/Conv_0"] == ("PreActBlock_2/Conv_0", "PreActBlock_2/Conv_2")  # projection + conv2
    assert model.placements()["Conv_0"] == "conv" and model.placements()["PreActBlock_0/Conv_0"] == "norm"
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 1))
    np.testing.assert_array_equal(model(x), m.apply(variables, x))
    for p in model.mask_points():
        for c in (0, p.size - 1):
            masks = {p.name: jnp.ones(p.size).at[c].set(0.0)}
            want = m.apply(_zeroed(variables, model, p.name, c), x)
            np.testing.assert_allclose(model(x, masks), want, rtol=1e-5, atol=1e-5, err_msg=f"{p.name}[{c}]")
    # what the check guards against: the stem masked after the BN reading it does not drop its kernel
    naive = cs.adapt(m, variables, input_shape=(16, 16, 1), ties="none", placements={"Conv_0": "norm"}, verify=False)
    bad = dict(failing_points(naive))
    assert set(bad) == {"Conv_0"} and bad["Conv_0"] > 0.01
    masks = {"Conv_0": jnp.ones(8).at[0].set(0.0)}
    assert float(jnp.abs(naive(x, masks) - m.apply(_zeroed(variables, naive, "Conv_0", 0), x)).max()) > 0.01
    # kernel counts: each gated conv counted once, as for the zoo's tied points
    assert cs.total_kernels(model) == 8 + 8 * 4 + 16 * 3


def test_concern_identification_refuses_nodes_that_are_not_relu_inputs(wrn):
    m, variables = wrn
    with pytest.raises(cs.AdapterError, match=r"node\(s\) \[.*PreActBlock_0/Conv_1.*\] of adapted:PreActWRN feed "
                                              r"something else"):
        cs.adapt(m, variables, input_shape=(16, 16, 1), kind="node")
    model = cs.adapt(m, variables, input_shape=(16, 16, 1), kind="node", require_relu=False)
    assert len(model.nodes()) == 8
    with pytest.raises(ValueError, match="residual='sum' needs the zoo's ResNets"):
        model.nodes("sum")


class ImageNetBlock(nn.Module):
    """Flax's ImageNet example ``ResNetBlock`` (conv / norm / act passed in as fields)."""

    filters: int
    conv: Any
    norm: Any
    act: Callable
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.norm()(self.conv(self.filters, (3, 3))(y))
        if residual.shape != y.shape:
            residual = self.norm(name="norm_proj")(self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual))
        return self.act(residual + y)


class ImageNetResNet(nn.Module):
    """Flax's ImageNet example ``ResNet``, narrow: ``stage_sizes`` is a list field (unhashable)."""

    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 4

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = nn.relu(norm(name="bn_init")(conv(self.num_filters, (3, 3), name="conv_init")(x)))
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ImageNetBlock(self.num_filters * 2 ** i, conv, norm, nn.relu, strides)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def test_a_list_field_linen_resnet_runs_concern_identification(digits):
    m = ImageNetResNet(stage_sizes=[1, 1], num_classes=10)
    variables = _trained_like(m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))), seed=1)
    with pytest.raises(cs.AdapterError, match=r"apply_kwargs=\{'train': False\}"):  # BatchNorm in training mode
        cs.adapt(m, variables, input_shape=(32, 32, 1), kind="node")
    model = cs.adapt(m, variables, input_shape=(32, 32, 1), kind="node", apply_kwargs={"train": False})
    data = cs.SplitData(digits.x_train[:200], digits.y_train[:200], digits.x_train[:0], digits.y_train[:0],
                        digits.info.mean, digits.info.std)
    res = cs.splitters.concern.split(jax.random.key(0), model, data,
                                     cs.ConcernConfig(concerned_per_class=10, min_confidence=None))
    ms = res.module_set
    assert ms.num_modules == 10 and set(ms.inactive) == {n.name for n in model.nodes()}
    assert 0.0 < ms.structure()["module_size"]["mean_active_fraction"] < 1.0  # positions were deactivated
    with pytest.raises(ValueError, match="residual='sum'"):
        cs.splitters.concern.split(jax.random.key(0), model, data, cs.ConcernConfig(residual="sum"))


class SmallNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.drop(nnx.relu(self.bn(self.conv(x)))).mean((1, 2)))


class SmallLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_common_flax_mistakes_are_named_with_what_to_pass(wrn):
    net = SmallNNX(nnx.Rngs(0))
    with pytest.raises(cs.AdapterError, match=r"nnx.BatchNorm at 'bn' is in training mode .* call model.eval\(\)"):
        cs.adapt(net, input_shape=(8, 8, 1))
    net.eval()
    assert cs.adapt(net, input_shape=(8, 8, 1)).num_classes == 10
    lin = SmallLinen()
    params = lin.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(cs.AdapterError, match=r"if these are the parameters alone, pass \{'params': params\}"):
        cs.adapt(lin, params["params"], input_shape=(8, 8, 1))
    with pytest.raises(cs.AdapterError, match=r"not this model's \(other shapes: .*Dense_0.*kernel.*input_shape "
                                              r"\(12, 12, 1\)"):
        cs.adapt(lin, params, input_shape=(12, 12, 1))  # trained on 8x8 images
    m, variables = wrn
    with pytest.raises(cs.AdapterError, match=r"not this model's \(missing: .*; not in the model: .*Block"):
        cs.adapt(lin, variables, input_shape=(8, 8, 1))  # another model's variables
    with pytest.raises(cs.AdapterError, match="apply_kwargs do not match the arguments"):
        cs.adapt(m, variables, input_shape=(16, 16, 1), apply_kwargs={"training": False})
