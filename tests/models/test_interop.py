import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cnnsplit_jax.models.interop import load_torch_state_dict, to_torch_state_dict, torch_model  # noqa: E402
from cnnsplit_jax.models import ones_masks  # noqa: E402


def _randomize(tm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


@pytest.mark.parametrize("arch", ["simcnn", "rescnn", "incecnn"])
def test_torch_state_dict_gives_equal_logits(arch, tmp_path):
    torch.manual_seed(0)
    tm = torch_model(arch, num_classes=7, in_channels=3, width=0.25)
    _randomize(tm, 1)
    path = tmp_path / "estimator_1.pth"
    torch.save(tm.state_dict(), path)
    model = load_torch_state_dict(arch, path)
    assert model.num_classes == 7 and model.in_channels == 3 and model.width == 0.25
    x = np.random.RandomState(0).randn(6, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    got = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-3  # not a trivially zero comparison
    # masked forward agrees as well (masks after ReLU, tied ResCNN points)
    masks = ones_masks(model)
    masks = {k: v.at[::3].set(0.0) for k, v in masks.items()}
    with torch.no_grad():
        ref_m = tm(torch.from_numpy(x), {k: torch.from_numpy(np.array(v)) for k, v in masks.items()}).numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)), masks)), ref_m, atol=1e-4, rtol=0)
    # and back: our layout -> reference layout is the exact inverse
    back = to_torch_state_dict(model)
    for k, v in tm.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[k], v.numpy())


def test_bn_training_statistics_match_torch():
    torch.manual_seed(0)
    tm = torch_model("rescnn", num_classes=4, in_channels=3, width=0.125)
    model = load_torch_state_dict("rescnn", tm.state_dict())
    x = np.random.RandomState(1).randn(8, 3, 32, 32).astype(np.float32)
    tm.train()
    tm.features(torch.from_numpy(x))  # BN in train mode updates running stats (unbiased var)
    import jax

    model(jnp.asarray(x.transpose(0, 2, 3, 1)), train=True, dropout_key=jax.random.key(0))
    sd = tm.state_dict()
    np.testing.assert_allclose(np.asarray(model.conv_4.mean[...]), sd["conv_4.1.running_mean"].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.conv_4.var[...]), sd["conv_4.1.running_var"].numpy(), rtol=1e-4)


def test_bad_state_dicts():
    tm = torch_model("simcnn", num_classes=3, in_channels=1, width=0.0625)
    sd = dict(tm.state_dict())
    with pytest.raises(ValueError, match="unknown model"):
        load_torch_state_dict("lenet", sd)
    missing = {k: v for k, v in sd.items() if k != "conv_4.1.running_var"}
    with pytest.raises(ValueError, match="missing key 'conv_4.1.running_var'"):
        load_torch_state_dict("simcnn", missing)
    extra = {**sd, "module_head.0.weight": torch.zeros(10, 3)}
    with pytest.raises(ValueError, match="module checkpoint"):
        load_torch_state_dict("simcnn", extra)
    with pytest.raises(ValueError, match="not a reference rescnn"):
        load_torch_state_dict("rescnn", sd)
