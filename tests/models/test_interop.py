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


@pytest.mark.parametrize("arch", ["simcnn", "rescnn", "incecnn"])
def test_mask_gradients_equal_torch_including_dropped_kernels(arch):
    """The gradient of the loss w.r.t. every module mask entry, dropped (0) entries included,
    equals torch's autograd on the same weights and masks (max-pool ties follow torch)."""
    torch.manual_seed(3)
    tm = torch_model(arch, num_classes=5, in_channels=3, width=0.125)
    _randomize(tm, 4)
    model = load_torch_state_dict(arch, tm.state_dict())
    rng = np.random.default_rng(5)
    masks = {k: (rng.random(v.shape) > 0.4).astype(np.float32) for k, v in ones_masks(model).items()}
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    y = np.array([0, 1, 2, 4])
    tmasks = {k: torch.tensor(v, requires_grad=True) for k, v in masks.items()}
    loss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(x), tmasks), torch.from_numpy(y), reduction="sum")
    loss.backward()
    import jax
    import optax

    def f(m):
        logits = model(jnp.asarray(x.transpose(0, 2, 3, 1)), m)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).sum()

    grads = jax.grad(f)({k: jnp.asarray(v) for k, v in masks.items()})
    dropped = 0
    for k, v in masks.items():
        ref = tmasks[k].grad.numpy()
        scale = max(np.abs(ref).max(), 1e-6)
        np.testing.assert_allclose(np.asarray(grads[k]) / scale, ref / scale, atol=1e-4, err_msg=k)
        dropped += int(((v == 0) & (np.abs(ref) > 1e-3 * scale)).sum())
    assert dropped > 10  # dropped entries with real gradients were compared


def _cnnsplitter_torch(arch, num_classes, seed):
    """CNNSplitter's own PyTorch models as its paper and code define them (no BatchNorm;
    SimCNN: conv_i = Conv2d, FC 512; ResCNN: conv_i = Conv2d + ReLU (+ MaxPool), classifier =
    Flatten, Dropout(0.4), Linear), at full width, written here independently of our models."""
    from torch import nn

    torch.manual_seed(seed)
    if arch == "simcnn_cnnsplitter":
        ch = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512)] + [(512, 512)] * 5

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                for i, (a, b) in enumerate(ch):
                    setattr(self, f"conv_{i}", nn.Conv2d(a, b, 3, padding=1))
                self.fc_13, self.fc_14, self.fc_15 = nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, num_classes)

            def forward(self, x):
                for i in range(13):
                    x = torch.relu(getattr(self, f"conv_{i}")(x))
                    if i in (1, 3, 6, 9, 12):
                        x = torch.max_pool2d(x, 2)
                x = torch.relu(self.fc_13(x.flatten(1)))
                return self.fc_15(torch.relu(self.fc_14(x)))
    else:
        cfg = [(3, 64, False), (64, 128, True), (128, 128, False), (128, 128, False), (128, 256, True),
               (256, 512, True), (512, 512, False), (512, 512, False), (512, 512, True), (512, 512, True),
               (512, 512, False), (512, 512, False)]

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                for i, (a, b, pool) in enumerate(cfg):
                    layers = [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else [])
                    setattr(self, f"conv_{i}", nn.Sequential(*layers))
                self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.4), nn.Linear(512, num_classes))

            def forward(self, x):
                x = self.conv_1(self.conv_0(x))
                for a in (2, 6, 10):
                    x = getattr(self, f"conv_{a + 1}")(getattr(self, f"conv_{a}")(x)) + x
                    if a < 10:
                        x = getattr(self, f"conv_{a + 3}")(getattr(self, f"conv_{a + 2}")(x))
                return self.classifier(x)
    return M().eval()


@pytest.mark.parametrize("arch", ["simcnn_cnnsplitter", "rescnn_cnnsplitter"])
def test_cnnsplitter_state_dicts_load_and_agree(arch):
    tm = _cnnsplitter_torch(arch, 10, seed=7)
    model = load_torch_state_dict(arch, tm.state_dict())
    assert model.arch == arch and model.width == 1.0 and not model.batch_norm
    assert getattr(model, "fc_hidden", 512) == 512
    x = np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    got = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)
    back = to_torch_state_dict(model)
    assert set(back) == set(tm.state_dict())
    # a GradSplitter state dict is not a CNNSplitter one
    with pytest.raises(ValueError, match="not a reference"):
        load_torch_state_dict(arch, to_torch_state_dict(load_torch_state_dict(
            "rescnn", torch_model("rescnn", num_classes=10, width=0.125).state_dict())))


def _weak_torch(arch: str, num_classes: int, seed: int):
    """CNNSplitter's four weak patching models in PyTorch, transcribed from
    ``src/experiments/patch/patch_for_weak_model`` (their key names, NCHW flatten, no BN)."""
    from torch import nn

    torch.manual_seed(seed)
    k, c, n = {"simcnn_weak": (3, 64, 4), "rescnn_weak": (3, 64, 4), "simcnn_svhn_weak": (5, 8, 2),
               "rescnn_svhn_weak": (5, 8, 4)}[arch]
    pad = 0 if arch == "simcnn_svhn_weak" else k // 2
    conv = lambda i: nn.Conv2d(3 if i == 0 else c, c, k, padding=pad)  # noqa: E731
    pool = lambda h: torch.max_pool2d(h, 2, 2)  # noqa: E731

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            sim = arch.startswith("simcnn")
            for i in range(n):
                setattr(self, f"conv_{i}", conv(i) if sim else nn.Sequential(conv(i), nn.ReLU()))
            fin = {"simcnn_weak": 256, "rescnn_weak": 4096, "simcnn_svhn_weak": 200, "rescnn_svhn_weak": 512}[arch]
            if sim:
                setattr(self, f"fc_{n}", nn.Linear(fin, num_classes))
            elif arch == "rescnn_weak":
                self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.4), nn.Linear(fin, num_classes))
            else:
                self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(fin, num_classes))

        def forward(self, x):
            if arch.startswith("simcnn"):
                for i in range(n):
                    x = pool(torch.relu(getattr(self, f"conv_{i}")(x)))
                return getattr(self, f"fc_{n}")(x.flatten(1))
            r = pool(self.conv_0(x))
            x = self.conv_2(self.conv_1(r)) + r
            x = pool(self.conv_3(x)) if arch == "rescnn_weak" else pool(x)  # svhn: conv_3 never called
            return self.classifier(x)
    return M().eval()


WEAK = ["simcnn_weak", "rescnn_weak", "simcnn_svhn_weak", "rescnn_svhn_weak"]


def _max_error(tm, model, seed=1):
    """Largest |our logit - torch's| on 3 images, relative to max(1, the largest |logit|)."""
    x = np.random.RandomState(seed).randn(3, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    got = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("arch", WEAK)
def test_weak_models_load_from_the_reference_layout_and_agree(arch):
    tm = _weak_torch(arch, 10, seed=3)
    model = load_torch_state_dict(arch, tm.state_dict())
    assert model.arch == arch and model.width == 1.0 and not model.batch_norm
    assert _max_error(tm, model) < 1e-4
    back = to_torch_state_dict(model)
    assert set(back) == set(tm.state_dict())
    tm2 = _weak_torch(arch, 10, seed=4)
    tm2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)
    assert _max_error(tm2, model, seed=2) < 1e-4  # ours -> theirs: the flatten permutation inverted
    if arch == "rescnn_svhn_weak":  # the uncalled conv_3 is written as zeros
        assert not back["conv_3.0.weight"].any() and back["conv_3.0.weight"].shape == (8, 8, 5, 5)


def test_weak_fc_permutation_is_not_the_identity():
    """Loading the NCHW-flattened FC without the permutation would give other logits."""
    tm = _weak_torch("simcnn_weak", 4, seed=5)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    good = load_torch_state_dict("simcnn_weak", sd)
    bad = load_torch_state_dict("simcnn_weak", sd)
    bad.fc_4.kernel[...] = jnp.asarray(sd["fc_4.weight"].T)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32))
    assert not np.allclose(np.asarray(good(x)), np.asarray(bad(x)), atol=1e-3)


_WEAK_FILES = {"simcnn_weak": ("simcnn_weak.py", "SimCNNWeak"), "rescnn_weak": ("rescnn_weak.py", "ResCNNWeak"),
               "simcnn_svhn_weak": ("simcnn_svhn_weak.py", "SimCNNSVHNWeak"),
               "rescnn_svhn_weak": ("rescnn_svhn_weak.py", "ResCNNSVHNWeak")}


@pytest.mark.parametrize("arch", WEAK)
def test_weak_models_equal_the_authors_classes(arch, reference_cnnsplitter):
    """Oracle: the authors' own weak model classes (a checkout named by
    CNNSPLIT_REFERENCE_CNNSPLITTER), with their init, their key names and their forward."""
    fname, cls = _WEAK_FILES[arch]
    mod = reference_cnnsplitter.load(f"experiments/patch/patch_for_weak_model/{fname}")
    torch.manual_seed(0)
    theirs = getattr(mod, cls)(num_classes=10).eval()
    ours = load_torch_state_dict(arch, theirs.state_dict())
    assert _max_error(theirs, ours) < 1e-4
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(ours).items()},
                           strict=True)
    assert _max_error(theirs, ours, seed=5) < 1e-4
