import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.models import (
    count_params,
    flatten_masks,
    kept_kernels,
    mask_points,
    ones_masks,
    total_kernels,
)
from cnnsplit_jax.models import build_model


@pytest.mark.parametrize(
    "arch,kernels,params,points",
    [("simcnn", 4224, 33_646_666, 13), ("rescnn", 4288, 16_018_698, 9), ("incecnn", 3200, 12_637_898, 12)],
)
def test_paper_kernel_and_param_counts(arch, kernels, params, points):
    m = build_model(arch, num_classes=10, in_channels=3, width=1.0)
    assert total_kernels(m) == kernels
    assert count_params(m) == params
    assert len(mask_points(m)) == points


def test_rescnn_tied_mask_points():
    m = build_model("rescnn", width=1.0)
    pts = {p.name: p for p in mask_points(m)}
    assert sum(p.size for p in pts.values()) == 3136  # mask parameters per module (spec 1.4)
    assert pts["conv_1"].layers == ("conv_1", "conv_3")
    assert pts["conv_5"].layers == ("conv_5", "conv_7")
    assert pts["conv_9"].layers == ("conv_9", "conv_11")
    assert "conv_3" not in pts and "conv_7" not in pts
    flat = flatten_masks(m, ones_masks(m))
    assert flat.shape == (4288,)


@pytest.mark.parametrize("arch", ["simcnn", "rescnn", "incecnn"])
@pytest.mark.parametrize("width,classes,channels", [(0.0625, 3, 1), (0.125, 10, 3), (0.25, 7, 2)])
def test_output_shapes(arch, width, classes, channels):
    m = build_model(arch, num_classes=classes, in_channels=channels, width=width, key=1)
    y = m(jnp.ones((5, 32, 32, channels)))
    assert y.shape == (5, classes)
    assert np.isfinite(np.asarray(y)).all()
    # the papers' channel counts at this width, by hand (SimCNN 64..512, ResCNN 64..512 with
    # 9 points, InceCNN stem 64/128/256 then branches 256/256/64, 512/512/64, 512/512/64)
    full = {"simcnn": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
            "rescnn": [64, 128, 128, 256, 512, 512, 512, 512, 512],
            "incecnn": [64, 128, 256, 256, 256, 64, 512, 512, 64, 512, 512, 64]}[arch]
    want = {0.0625: [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32],
            0.125: [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64],
            0.25: [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]}
    by_width = {64: 0, 128: 2, 256: 4, 512: 7}  # index of that full width in the SimCNN row
    assert [p.size for p in mask_points(m)] == [want[width][by_width[c]] for c in full]


@pytest.mark.parametrize("arch,kernels,fc_in,params", [
    ("simcnn_weak", 256, 256, 4 * 64 + 9 * (3 * 64 + 3 * 64 * 64) + 257 * 10),
    ("rescnn_weak", 256, 4096, 4 * 64 + 9 * (3 * 64 + 3 * 64 * 64) + 4097 * 10),
    ("simcnn_svhn_weak", 16, 200, 2 * 8 + 25 * (3 * 8 + 8 * 8) + 201 * 10),
    ("rescnn_svhn_weak", 24, 512, 3 * 8 + 25 * (3 * 8 + 2 * 8 * 8) + 513 * 10)])
def test_weak_models_of_the_patching_experiments(arch, kernels, fc_in, params):
    """Sizes of the reference's weak models (no BatchNorm: conv weights + biases + FC), by hand."""
    m = build_model(arch, num_classes=10, in_channels=3, width=1.0, key=0)
    assert total_kernels(m) == kernels and m.fc_in == fc_in and not m.batch_norm
    assert count_params(m) == params
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)
    assert m(x).shape == (3, 10)
    if arch.startswith("rescnn"):  # conv_2 shares conv_0's mask: the shortcut's channels
        assert [p.layers for p in mask_points(m)][0] == ("conv_0", "conv_2")


@pytest.mark.parametrize("arch", ["simcnn", "rescnn", "incecnn", "simcnn_weak", "rescnn_weak", "simcnn_svhn_weak",
                                  "rescnn_svhn_weak"])
def test_features_then_fc_chain_equal_forward(arch):
    m = build_model(arch, num_classes=7, in_channels=1, width=0.125, key=3)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 1)), jnp.float32)
    f = m.features(x)
    assert f.shape == (4, m.fc_in)
    h = m.fc_chain(f, 0, 1)
    np.testing.assert_allclose(np.asarray(m.fc_chain(h, 1)), np.asarray(m(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["simcnn", "rescnn", "incecnn"])
def test_ones_masks_equal_no_masks_and_kept_counts(arch):
    m = build_model(arch, num_classes=4, in_channels=3, width=0.125, key=2)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    np.testing.assert_array_equal(m(x, ones_masks(m)), m(x))
    masks = ones_masks(m)
    first = mask_points(m)[1]
    masks[first.name] = masks[first.name].at[:3].set(0.0)
    assert int(kept_kernels(m, masks)) == total_kernels(m) - 3 * len(first.layers)
    batched = ones_masks(m, (6,))
    assert kept_kernels(m, batched).shape == (6,)


def _randomize_bn(model, key):
    for spec in model.topology:
        layer = getattr(model, spec.name)
        key, k1, k2 = jax.random.split(key, 3)
        layer.mean[...] = jax.random.normal(k1, layer.mean.shape) * 0.1
        layer.var[...] = jax.random.uniform(k2, layer.var.shape, minval=0.5, maxval=1.5)


def test_zeroed_mask_removes_exactly_that_channel_simcnn():
    m = build_model("simcnn", num_classes=5, in_channels=3, width=0.125, key=3)
    _randomize_bn(m, jax.random.key(1))
    x = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
    j = 2
    masks = ones_masks(m)
    masks["conv_5"] = masks["conv_5"].at[j].set(0.0)
    masked = m(x, masks)
    assert not np.allclose(masked, m(x), atol=1e-6)  # the channel mattered
    # same as deleting channel j's contribution: zero conv_6's input weights from channel j
    m.conv_6.kernel[...] = m.conv_6.kernel[...].at[:, :, j, :].set(0.0)
    np.testing.assert_allclose(masked, m(x), rtol=1e-5, atol=1e-6)


def test_zeroed_mask_last_layer_equals_dropping_fc_input():
    m = build_model("simcnn", num_classes=5, in_channels=3, width=0.125, key=5)
    x = jax.random.normal(jax.random.key(6), (3, 32, 32, 3))
    masks = ones_masks(m)
    masks["conv_12"] = masks["conv_12"].at[0].set(0.0)
    masked = m(x, masks)
    m.fc_13.kernel[...] = m.fc_13.kernel[...].at[0, :].set(0.0)
    np.testing.assert_allclose(masked, m(x), rtol=1e-5, atol=1e-6)


def test_zeroed_inception_branch_channel():
    m = build_model("incecnn", num_classes=5, in_channels=3, width=0.125, key=7)
    _randomize_bn(m, jax.random.key(2))
    x = jax.random.normal(jax.random.key(8), (2, 32, 32, 3))
    j = 1
    masks = ones_masks(m)
    masks["conv_4"] = masks["conv_4"].at[j].set(0.0)  # block-1 branch b
    masked = m(x, masks)
    off = m.topology[3].out_channels  # branch a comes first in the concat
    for name in ("conv_6", "conv_7", "conv_8"):
        layer = getattr(m, name)
        layer.kernel[...] = layer.kernel[...].at[:, :, off + j, :].set(0.0)
    np.testing.assert_allclose(masked, m(x), rtol=1e-5, atol=1e-6)


def test_rescnn_tied_mask_gates_both_summands():
    m = build_model("rescnn", num_classes=5, in_channels=3, width=0.125, key=9)
    x = jax.random.normal(jax.random.key(10), (2, 32, 32, 3))
    masks = ones_masks(m)
    masks["conv_9"] = masks["conv_9"].at[0].set(0.0)
    masked = m(x, masks)
    # conv_9's channel 0 reaches the FC only through the shortcut and conv_11's output; both
    # are gated by the shared mask, so dropping fc_12's input row 0 gives the same logits
    m.fc_12.kernel[...] = m.fc_12.kernel[...].at[0, :].set(0.0)
    m.conv_10.kernel[...] = m.conv_10.kernel[...].at[:, :, 0, :].set(0.0)
    np.testing.assert_allclose(masked, m(x), rtol=1e-5, atol=1e-6)


def test_masks_vmap_over_modules():
    m = build_model("simcnn", num_classes=4, in_channels=1, width=0.0625, key=11)
    x = jax.random.normal(jax.random.key(12), (3, 32, 32, 1))
    masks = jax.tree.map(
        lambda a: (jax.random.uniform(jax.random.key(a.shape[-1]), a.shape) > 0.3).astype(a.dtype),
        ones_masks(m, (5,)),
    )
    out = jax.jit(jax.vmap(lambda mk: m(x, mk)))(masks)
    assert out.shape == (5, 3, 4)
    for i in range(5):
        np.testing.assert_allclose(
            out[i], m(x, jax.tree.map(lambda a: a[i], masks)), rtol=1e-5, atol=1e-5
        )


def test_input_and_mask_errors():
    m = build_model("simcnn", num_classes=4, in_channels=3, width=0.0625)
    with pytest.raises(ValueError, match=r"expects images \[B, 32, 32, 3\].*\(2, 28, 28, 3\)"):
        m(jnp.ones((2, 28, 28, 3)))
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 1\)"):
        m(jnp.ones((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="unknown mask point"):
        m(jnp.ones((1, 32, 32, 3)), {"conv_99": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"mask 'conv_0' .* shape \(4,\)"):
        m(jnp.ones((1, 32, 32, 3)), {"conv_0": jnp.ones(5)})
    with pytest.raises(ValueError, match="dropout_key"):
        m(jnp.ones((1, 32, 32, 3)), train=True)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg99")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("simcnn", num_classes=1)
    with pytest.raises(ValueError, match="lack mask point"):
        kept_kernels(m, {"conv_0": jnp.ones(4)})


def test_vgg16_bn_equals_pytorch_layers_with_the_same_weights():
    """MwT's VGG16-BN at width 1/8, 2-channel images, 7 classes (the authors' class, width 1
    only, is the oracle of tests/test_reference_oracles.py): PyTorch's Conv2d / BatchNorm2d /
    MaxPool2d / Linear in eval mode give our logits; the classifier is Linear -> ReLU -> Dropout
    twice, then Linear; init N(0, 0.01) for the Linear layers, bias 0."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    m = build_model("vgg16_bn", num_classes=7, in_channels=2, width=0.125, key=3)
    assert m.fc_hidden == 64 and [s.out_channels for s in m.topology] == [8, 8, 16, 16, 32, 32, 32] + [64] * 6
    for fc in ("fc_13", "fc_14", "fc_15"):
        k = np.asarray(getattr(m, fc).kernel[...])
        assert abs(k.std() - 0.01) < 0.002 and not np.asarray(getattr(m, fc).bias[...]).any()
    rng = np.random.default_rng(0)
    layers, cin = [], 2
    for i, s in enumerate(m.topology):
        ours = getattr(m, s.name)
        for f, lo in (("mean", None), ("var", 0.5), ("scale", 0.5), ("offset", None)):
            v = rng.uniform(lo, 1.5, ours.mean.shape) if lo else rng.normal(0, 0.1, ours.mean.shape)
            getattr(ours, f)[...] = jnp.asarray(v, jnp.float32)
        conv, bn = nn.Conv2d(cin, s.out_channels, 3, padding=1), nn.BatchNorm2d(s.out_channels)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.asarray(ours.kernel[...]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(ours.bias[...]) + 0.0))
            for f, t in (("scale", bn.weight), ("offset", bn.bias), ("mean", bn.running_mean),
                         ("var", bn.running_var)):
                t.copy_(torch.from_numpy(np.asarray(getattr(ours, f)[...]).copy()))
        layers += [conv, bn, nn.ReLU()] + ([nn.MaxPool2d(2, 2)] if i in (1, 3, 6, 9, 12) else [])
        cin = s.out_channels
    fcs = [nn.Linear(cin, 64), nn.Linear(64, 64), nn.Linear(64, 7)]
    for fc, name in zip(fcs, ("fc_13", "fc_14", "fc_15")):
        fc.bias.data.normal_(0, 0.1)  # nonzero biases, so a bias left out would show
        getattr(m, name).bias[...] = jnp.asarray(fc.bias.detach().numpy())
        fc.weight.data.copy_(torch.from_numpy(np.asarray(getattr(m, name).kernel[...]).T.copy() * 30))
        getattr(m, name).kernel[...] = jnp.asarray(fc.weight.detach().numpy().T)
    net = nn.Sequential(*layers, nn.Flatten(), fcs[0], nn.ReLU(), nn.Dropout(), fcs[1], nn.ReLU(), nn.Dropout(),
                        fcs[2]).eval()
    x = rng.normal(size=(4, 2, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = np.asarray(m(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    # dropout follows each hidden layer (SimCNN's precedes them): the head in training mode, by hand
    from cnnsplit_jax.models.base import dropout

    h = jnp.asarray(rng.normal(size=(4, m.fc_in)), jnp.float32)
    k1, k2 = jax.random.split(jax.random.key(5))
    by_hand = m.fc_15(dropout(jax.nn.relu(m.fc_14(dropout(jax.nn.relu(m.fc_13(h)), 0.5, k1))), 0.5, k2))
    np.testing.assert_allclose(np.asarray(m._head(h, True, jax.random.key(5))), np.asarray(by_hand), rtol=1e-6)


def test_resnet18_equals_pytorch_basic_blocks_with_the_same_weights():
    """MwT's ResNet-18 at width 1/8, 7 classes, in eval mode (the authors' class at width 1 is
    the oracle of tests/test_reference_oracles.py): PyTorch's Conv2d (padding 1 at stride 2,
    1x1 stride-2 shortcuts) / BatchNorm2d / residual sums give our logits."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    m = build_model("resnet18", num_classes=7, in_channels=3, width=0.125, key=2)
    tied = [p.layers for p in mask_points(m) if len(p.layers) > 1]
    assert tied == [("conv_0", "s0b0_conv2", "s0b1_conv2")] + [
        (f"s{s}b0_down", f"s{s}b0_conv2", f"s{s}b1_conv2") for s in (1, 2, 3)]
    assert len(m.gate_layers()) == 19 and m.fc_in == 64
    rng = np.random.default_rng(1)

    def conv_bn(name):
        ours = getattr(m, name)
        k = np.asarray(ours.kernel[...])
        spec = m.spec(name)
        conv = nn.Conv2d(k.shape[2], k.shape[3], spec.ksize, stride=spec.stride, padding=spec.ksize // 2)
        bn = nn.BatchNorm2d(k.shape[3])
        for f, lo in (("mean", None), ("var", 0.5), ("scale", 0.5), ("offset", None), ("bias", None)):
            v = rng.uniform(lo, 1.5, k.shape[3]) if lo else rng.normal(0, 0.1, k.shape[3])
            getattr(ours, f)[...] = jnp.asarray(v, jnp.float32)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(ours.bias[...]).copy()))
            for f, t in (("scale", bn.weight), ("offset", bn.bias), ("mean", bn.running_mean),
                         ("var", bn.running_var)):
                t.copy_(torch.from_numpy(np.asarray(getattr(ours, f)[...]).copy()))
        return nn.Sequential(conv, bn).eval()

    stem = conv_bn("conv_0")
    blocks = [(conv_bn(f"s{s}b{b}_conv1"), conv_bn(f"s{s}b{b}_conv2"),
               conv_bn(f"s{s}b{b}_down") if s and not b else None) for s in range(4) for b in range(2)]
    fc = nn.Linear(64, 7)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.asarray(m.fc.kernel[...]).T.copy()))
        fc.bias.copy_(torch.from_numpy(np.asarray(m.fc.bias[...]).copy()))
    x = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        h = torch.relu(stem(torch.from_numpy(x)))
        for c1, c2, down in blocks:
            h = torch.relu(c2(torch.relu(c1(h))) + (down(h) if down is not None else h))
        want = fc(h.mean(dim=(2, 3))).numpy()
    got = np.asarray(m(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
