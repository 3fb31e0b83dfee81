import json
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.models import effective_masks
from cnnsplit_jax.modules.extract import extract_all, extract_module, forward_flops
from cnnsplit_jax.modules.forward import extracted_scores as module_scores
from cnnsplit_jax.modules.heads import head_scores, init_heads
from cnnsplit_jax.models import ones_masks, total_kernels
from cnnsplit_jax.models import build_model


def _random_bn(model, key):
    for s in model.topology:
        layer = getattr(model, s.name)
        key, k1, k2, k3 = jax.random.split(key, 4)
        layer.mean[...] = jax.random.normal(k1, layer.mean.shape) * 0.1
        layer.var[...] = jax.random.uniform(k2, layer.var.shape, minval=0.5, maxval=1.5)
        layer.offset[...] = jax.random.normal(k3, layer.offset.shape) * 0.1


@pytest.mark.parametrize("arch", ["simcnn", "rescnn", "incecnn", "resnet18"])
def test_extracted_modules_equal_masked_forward(arch):
    n = 4
    model = build_model(arch, num_classes=n, in_channels=3, width=0.125, key=1)
    _random_bn(model, jax.random.key(5))
    rs = np.random.RandomState(0)
    masks = {k: (rs.rand(*v.shape) > 0.5).astype(np.float32) for k, v in ones_masks(model, (n,)).items()}
    first = next(iter(masks))
    masks[first][2] = 0.0  # an empty layer: extraction keeps kernel 0 (reference rule)
    heads = init_heads(jax.random.key(0), n, n)
    x = jax.random.normal(jax.random.key(2), (5, 32, 32, 3))
    mods = extract_all(model, masks, heads)
    eff = {k: jnp.asarray(v) for k, v in effective_masks(masks).items()}
    dense = jax.vmap(lambda mk: model(x, mk))(eff)
    want = head_scores(heads, jnp.swapaxes(dense, 0, 1))
    got = jnp.stack([module_scores(m, x) for m in mods], -1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    base_flops = forward_flops(model)
    for c, m in enumerate(mods):
        kept = sum(eff[p][c].sum() * len([s for s in model.topology if s.mask == p]) for p in eff)
        assert total_kernels(m.model) == int(kept)  # physically smaller by exactly the masks
        assert m.model.conv_0.kernel.shape[-1] == int(eff["conv_0"][c].sum())
        assert forward_flops(m.model) < base_flops
    assert mods[2].kept[first].tolist() == [0]


def test_forward_flops_match_the_papers():
    # conv MACs per image (spec): SimCNN 313 M, ResCNN 431 M, InceCNN 1017 M (+ FC MACs)
    assert abs(forward_flops(build_model("simcnn")) / 2 - 313.2e6 - 18.9e6) < 1e6
    assert abs(forward_flops(build_model("rescnn")) / 2 - 431.2e6) < 1e6
    assert abs(forward_flops(build_model("incecnn")) / 2 - 1016.6e6) < 1e6


def test_rescnn_extraction_shapes_follow_tied_masks():
    model = build_model("rescnn", num_classes=3, in_channels=3, width=0.125, key=2)
    masks = {k: np.ones(v.shape[-1], np.float32) for k, v in ones_masks(model).items()}
    masks["conv_5"][:40] = 0  # 64 -> 24 kernels, shared by conv_5 and conv_7
    m = extract_module(model, masks, (np.zeros((3, 10)), np.zeros(10), np.zeros(10), np.zeros(())), 0)
    assert m.model.conv_5.kernel.shape[-1] == 24 and m.model.conv_7.kernel.shape[-1] == 24
    assert m.model.conv_6.kernel.shape[2] == 24 and m.model.conv_8.kernel.shape[2] == 24
    assert m.model.conv_6.kernel.shape[-1] == 64


def test_incecnn_extraction_offsets():
    model = build_model("incecnn", num_classes=3, in_channels=3, width=0.125, key=3)
    masks = {k: np.ones(v.shape[-1], np.float32) for k, v in ones_masks(model).items()}
    masks["conv_4"][:] = 0
    masks["conv_4"][5] = 1  # block-1 branch b keeps only kernel 5
    m = extract_module(model, masks, (np.zeros((3, 10)), np.zeros(10), np.zeros(10), np.zeros(())), 0)
    a = model.topology[3].out_channels
    # block-2 convs take channels [0..a) of branch a, a+5 of branch b, then all of branch c
    np.testing.assert_array_equal(m.model.conv_6.kernel[...][:, :, a], model.conv_6.kernel[...][:, :, a + 5])
    assert m.model.conv_6.kernel.shape[2] == a + 1 + model.topology[5].out_channels


def test_an_extracted_model_saves_its_channels_and_loads_back_equal(tmp_path):
    arch = "rescnn"  # tied residual layers: one mask, several layers
    from cnnsplit_jax import checkpoint as ckpt

    model = build_model(arch, num_classes=4, in_channels=3, width=0.125, key=1)
    _random_bn(model, jax.random.key(5))
    rs = np.random.RandomState(3)
    masks = {k: (rs.rand(*v.shape[1:]) > 0.4).astype(np.float32) for k, v in ones_masks(model, (1,)).items()}
    small = extract_module(model, masks, None, -1).model
    assert "channels" not in model.config()  # the full model's structure is its width
    want = {s.name: max(1, int(masks[s.mask].sum())) for s in model.topology}
    assert small.config()["channels"] == {k: v for k, v in want.items()
                                          if v != model.spec(k).out_channels}
    ckpt.save_model(tmp_path / "m", small, {"dataset": "x"})
    back, meta = ckpt.load_model(tmp_path / "m")
    assert {s.name: s.out_channels for s in back.topology} == want
    x = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(small(x)))
    # extracting again from the extracted model replaces its channels
    sizes = {p.name: p.size for p in small.mask_points()}
    again = extract_module(small, {k: np.ones(n, np.float32) for k, n in sizes.items()}, None, -1).model
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(small(x)), atol=1e-6)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**meta, "channels": {"conv_0": -1}}))
    with pytest.raises(ckpt.CheckpointError, match="positive channel counts"):
        ckpt.load_model(tmp_path / "m")
