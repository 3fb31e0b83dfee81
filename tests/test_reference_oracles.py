"""Oracles we did not write: the authors' own code, executed from a checkout of their public
repositories named by an environment variable (never vendored here):

    CNNSPLIT_REFERENCE_GRADSPLITTER=/path/to/GradSplitter   (github.com/qibinhang/GradSplitter)
    CNNSPLIT_REFERENCE_CNNSPLITTER=/path/to/CNNSplitter     (github.com/qibinhang/CNNSplitter)

Without them every test here is skipped with that reason. What each compares: their
``MySign`` against our straight-through step; their ``GradSplitter`` module forward, loss and
mask/head gradients against ``loss_fn`` on the same weights; their ``_calculating`` (accuracy
and diff of one composition) and ``_cal_fitness`` ranking against our joint fitness on the same
recorded module outputs, ties included; their GA's parent selection against ours.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cnnsplit_jax.models.interop import load_torch_state_dict  # noqa: E402
from cnnsplit_jax.splitters import gradsplitter as gs  # noqa: E402
from cnnsplit_jax.splitters.gradsplitter.loss import binarize, loss_fn  # noqa: E402


def test_their_sign_equals_our_straight_through_step(reference_gradsplitter):
    """Forward: strict (m > 0), so 0 and -0 are dropped; backward: hardtanh of the incoming
    gradient (the clip to [-1, 1])."""
    their = reference_gradsplitter.load("splitters/simcnn_splitter.py").MySign.apply
    m = np.array([-2.0, -1e-8, -0.0, 0.0, 1e-8, 0.3, 5.0], np.float32)
    g = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 7.0], np.float32)
    tm = torch.tensor(m, requires_grad=True)
    their(tm).backward(torch.tensor(g))
    out, vjp = jax.vjp(binarize, jnp.asarray(m))
    np.testing.assert_array_equal(np.asarray(out), their(torch.tensor(m)).numpy())
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), tm.grad.numpy())


def _their_rescnn_and_splitter(ref, n_classes, seed):
    model_mod = ref.load("models/rescnn.py")
    splitter_mod = ref.load("splitters/rescnn_splitter.py")
    torch.manual_seed(seed)
    tm = model_mod.ResCNN(num_classes=n_classes)
    with torch.no_grad():  # trained-looking BN statistics, not the identity
        for name, mod in tm.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    tm.eval()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # their constructor prints the head
        splitter = splitter_mod.GradSplitter(tm, "random")
    splitter.train()
    splitter.model.eval()  # as their train_splitter: BN in inference mode
    return tm, splitter


def test_their_gradsplitter_scores_loss_and_gradients_equal_ours(reference_gradsplitter):
    """ResCNN (tied residual masks, per-use clipping) at the reference's full width, 4 modules
    (their class takes N from the model), masks with exact zeros; alpha large enough that the
    kernel term's per-use gradient is clipped. Their loss is ``grad_splitter.loss_func``'s two
    lines (that file imports torchvision at module level): CE(predicts) + ratio * mean(kernels)."""
    n = 4
    tm, their = _their_rescnn_and_splitter(reference_gradsplitter, n, seed=0)
    ours = load_torch_state_dict("rescnn", tm.state_dict())
    rng = np.random.default_rng(1)
    points = [p.name for p in ours.mask_points()]
    masks = {}
    with torch.no_grad():
        for p in ours.mask_points():
            v = rng.normal(size=(n, p.size)).astype(np.float32) + 0.6
            v[:, ::7] = 0.0  # exact zeros: dropped (strict step)
            masks[p.name] = v
            for i in range(n):
                getattr(their, f"module_{i}_{p.name}").copy_(torch.from_numpy(v[i]))
    heads = [getattr(their, f"module_{i}_head") for i in range(n)]
    h = gs.Heads(*(jnp.asarray(np.stack(a)) for a in (
        [hd[0].weight.detach().numpy().T for hd in heads], [hd[0].bias.detach().numpy() for hd in heads],
        [hd[2].weight.detach().numpy()[0] for hd in heads], [hd[2].bias.detach().numpy()[0] for hd in heads])))
    x = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    y = np.array([0, 3, 1])
    for ratio in (0.0, 40000.0):  # 40000: per-use kernel-term gradient 40000 / (4 x 4288) = 2.3, clipped
        their.zero_grad()
        predicts = their(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(predicts, torch.from_numpy(y)) + ratio * torch.mean(
            their.get_module_kernels())
        loss.backward()

        def f(params, ratio=ratio):
            return loss_fn(params, ours, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(y), ratio)

        (got_loss, (_, _, scores)), grads = jax.value_and_grad(f, has_aux=True)(
            {"masks": {k: jnp.asarray(v) for k, v in masks.items()}, "heads": h})
        np.testing.assert_allclose(np.asarray(scores), predicts.detach().numpy(), rtol=1e-4, atol=1e-5)
        assert float(got_loss) == pytest.approx(float(loss.detach()), rel=1e-5)
        ref = {k: np.stack([getattr(their, f"module_{i}_{k}").grad.numpy() for i in range(n)]) for k in points}
        scale = max(np.abs(r).max() for r in ref.values())
        for k in points:  # relative to the largest gradient (CE alone: ~1e-3 here)
            np.testing.assert_allclose(np.asarray(grads["masks"][k]) / scale, ref[k] / scale, atol=2e-4,
                                       err_msg=f"{k} ratio {ratio}")
        if ratio:  # every entry got the clipped kernel term once per gated conv: 1 or 2, plus CE
            tied = {p.name: len(p.layers) for p in ours.mask_points()}
            assert all(np.abs(ref[k] - tied[k]).max() < 0.01 for k in points)
        else:
            assert scale > 1e-5 and sum(int((r != 0).sum()) for r in ref.values()) > 1000
        w1 = np.stack([hd[0].weight.grad.numpy().T for hd in heads])
        np.testing.assert_allclose(np.asarray(grads["heads"].w1), w1, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ CNNSplitter's joint fitness
class _SerialPool:
    """Their ``multiprocessing.Pool``, run in this process (same calls, same order)."""

    def __init__(self, n, initializer=None, initargs=()):
        if initializer:
            initializer(*initargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return [fn(i) for i in items]


def _their_recorder(ref, n_classes, pop, alpha, thresholds, perm):
    """Their ``module_recorder`` with the globals its ``__main__`` sets, its pool serial and
    its class shuffle replaced by ``perm`` (the order our generation would draw)."""
    from types import SimpleNamespace

    stubs = {"utils.configure_loader": {"load_configure": None},
             "utils.dataset_loader": {"get_dataset_loader": None},
             "utils.module_tools": {"load_modules": None, "evaluate_ensemble_modules": None}}
    rec = ref.load("module_recorder.py", stubs=stubs)

    def shuffle(items):
        items[:] = [items[c] for c in perm]

    rec.__dict__.update(number_class=n_classes, configs=SimpleNamespace(num_sol_per_pop=pop), alpha=alpha,
                        acc_thresholds=thresholds, NUM_CPU=1,
                        multiprocessing=SimpleNamespace(Pool=_SerialPool), random=SimpleNamespace(shuffle=shuffle))
    return rec


def _compositions_acc(logits, y, classes, rows):
    """Accuracy of each composition ``rows`` [R, len(classes)] (member per class) on the images
    of ``classes`` (argmax over the members' class logits; first maximum wins)."""
    sel = np.isin(y, classes)
    stack = np.stack([logits[c][rows[:, i]][:, sel] for i, c in enumerate(classes)], 1)  # [R, m, n]
    pred = np.asarray(classes)[stack.argmax(1)]
    return (pred == y[sel]).mean(-1)


@pytest.mark.parametrize("pop,generation", [(2, 0), (2, 1), (6, 0), (6, 1)])
def test_their_joint_fitness_equals_ours(reference_cnnsplitter, pop, generation):
    """5 classes (their svhn_5 tree: pairs, then 4, then 5), logits on a coarse grid so that
    argmax ties are common (first maximum = the left group's module), kernel sets with equal
    Jaccard distances. pop 2: every composition survives every level; pop 6: the 4- and
    5-class levels are cut at their accuracy threshold (chosen so that between min_keep and
    max_keep compositions reach it: the cut is then the threshold, not a tie-break among equal
    accuracies, which their unstable ``np.argsort`` leaves to numpy's sort). Generation 1
    checks the elitism guard (the all-zeros composition re-enters every level)."""
    from itertools import product

    from cnnsplit_jax.splitters.cnnsplitter.fitness import FitnessConfig, jaccard_distance_table, joint_fitness

    n, alpha, acc_ratio = 5, 0.9, 0.95
    perm = [3, 0, 4, 2, 1]
    rng = np.random.default_rng(pop + 10 * generation)
    y = np.repeat(np.arange(n), 8)
    logits = rng.integers(0, 4, size=(n, pop, len(y))).astype(np.float32)  # ties everywhere
    for c in range(n):  # each module sees its own class a bit better
        logits[c][:, y == c] += rng.integers(0, 3, size=(pop, int((y == c).sum())))
    kernels = rng.random((n, pop, 24)) < 0.5
    thr = {2: 0.0, 4: 0.0, 5: 0.0}
    if pop == 6:
        order = [perm[:2], perm[2:4]]
        rows4 = np.array(list(product(range(pop), repeat=4)))
        acc4 = _compositions_acc(logits, y, order[0] + order[1], rows4)
        thr[4] = float(np.sort(acc4)[::-1][150])
        keep4 = rows4[acc4 >= thr[4]]
        assert 50 <= len(keep4) <= 500
        rows5 = np.array([list(r) + [j] for r in keep4 for j in range(pop)])
        acc5 = _compositions_acc(logits, y, order[0] + order[1] + [perm[4]], rows5)
        thr[5] = float(np.sort(acc5)[::-1][200])
        assert 50 <= int((acc5 >= thr[5]).sum()) <= 500
    rec = _their_recorder(reference_cnnsplitter, n, pop, alpha, thr, perm)
    outputs = [[(logits[c, p][:, None], y, list(np.flatnonzero(kernels[c, p])), p) for p in range(pop)]
               for c in range(n)]
    their_diff = rec.cal_diff_with_multiprocess(outputs)
    their_fit, their_top = rec.cal_fitness(generation, outputs, their_diff, acc_ratio)
    D = np.asarray(jaccard_distance_table(jnp.asarray(kernels)))
    iu = np.triu_indices(n, 1)
    np.testing.assert_allclose(D[iu], their_diff[iu], atol=1e-6)  # they fill c < d only
    ours = joint_fitness(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(D), perm, acc_ratio=acc_ratio,
                         generation=generation, cfg=FitnessConfig(alpha=alpha, thresholds=thr))
    np.testing.assert_allclose(np.asarray(ours.fitness), their_fit, rtol=1e-5, atol=1e-6)
    _, best_fit, best_acc, best_diff = their_top[0]
    assert float(ours.best_fitness) == pytest.approx(best_fit, rel=1e-5)
    assert float(ours.best_accuracy) == pytest.approx(best_acc, rel=1e-6)
    assert float(ours.best_diff) == pytest.approx(best_diff, rel=1e-5)
    assert (their_fit > 0).sum() >= n  # not a vacuous all-zero comparison


def test_their_parent_selection_and_elites_equal_ours(reference_cnnsplitter):
    """Their pygad-derived ``GA.steady_state_selection`` ranks parents (50) and kept parents
    (20) of a population whose fitness has many ties; our GA's next population starts with
    their 20 kept parents in their order, and every child is a single-point cross of their
    parents ``k mod 50`` and ``(k + 1) mod 50`` (their ``single_point_crossover`` pairing)."""
    from types import SimpleNamespace

    from cnnsplit_jax.splitters.cnnsplitter.ga import CNNSplitterGA

    ga_mod = reference_cnnsplitter.load("ga.py")
    rng = np.random.default_rng(4)
    pop = rng.integers(0, 2, (100, 64)).astype(np.float32)
    fitness = rng.integers(0, 6, 100).astype(np.float64) / 5  # ~17 individuals per fitness value
    theirs = SimpleNamespace(population=pop)
    parents = ga_mod.GA.steady_state_selection(theirs, list(fitness), 50)
    kept = ga_mod.GA.steady_state_selection(theirs, list(fitness), 20)
    ga = CNNSplitterGA(100, jnp.zeros(64), num_parents=50, keep_parents=20, mutation_percent=0.0)
    params = ga.default_params
    state = ga.init(jax.random.key(0), jnp.asarray(pop), jnp.asarray(-fitness, jnp.float32), params)  # evosax minimises
    new, _ = ga.ask(jax.random.key(1), state, params)
    new = np.asarray(new)
    np.testing.assert_array_equal(new[:20], kept)
    for k, child in enumerate(new[20:]):
        a, b = parents[k % 50], parents[(k + 1) % 50]
        assert any((child[:c] == a[:c]).all() and (child[c:] == b[c:]).all() for c in range(64)), k
    # the tie order matters: a stable descending sort would keep other individuals
    stable = pop[np.argsort(-fitness, kind="stable")[:20]]
    assert not np.array_equal(stable, kept)


def _logits(theirs, ours, seed=0):
    """(our logits, theirs) on the same NCHW / NHWC images."""
    x = np.random.default_rng(seed).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x)).numpy()
    return np.asarray(ours(jnp.asarray(x.transpose(0, 2, 3, 1)))), ref


@pytest.mark.parametrize("arch,path,cls", [("simcnn", "models/simcnn.py", "SimCNN"),
                                          ("rescnn", "models/rescnn.py", "ResCNN"),
                                          ("incecnn", "models/incecnn.py", "InceCNN")])
def test_their_gradsplitter_models_give_our_logits(reference_gradsplitter, arch, path, cls):
    """Their model classes at full width, BN statistics randomised, in eval mode: our model
    loaded from their state dict gives their logits."""
    torch.manual_seed(1)
    theirs = getattr(reference_gradsplitter.load(path), cls)(num_classes=10)
    with torch.no_grad():
        for mod in theirs.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    theirs.eval()
    got, ref = _logits(theirs, load_torch_state_dict(arch, theirs.state_dict()))
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("arch,path,cls", [("simcnn_cnnsplitter", "models/simcnn.py", "SimCNN"),
                                          ("rescnn_cnnsplitter", "models/rescnn.py", "ResCNN")])
def test_their_cnnsplitter_models_give_our_logits(reference_cnnsplitter, arch, path, cls):
    torch.manual_seed(2)
    theirs = getattr(reference_cnnsplitter.load(path), cls)(num_classes=10).eval()
    got, ref = _logits(theirs, load_torch_state_dict(arch, theirs.state_dict()))
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def _t(a) -> "jnp.ndarray":
    return jnp.asarray(a.detach().numpy())


def test_their_mwt_vgg16_bn_with_its_mask_generators_gives_our_logits(reference_mwt):
    """MwT's VGG16-BN (their ``vgg_masked.py``: MaskConvBN on every conv but the first, each
    with its generator) in eval mode, BN statistics randomised: our ``vgg16_bn`` with the same
    weights and our generators gives their logits."""
    from cnnsplit_jax.models import build_model
    from cnnsplit_jax.splitters.mwt import generator_layers
    from cnnsplit_jax.splitters.mwt.training import generator_logits

    torch.manual_seed(4)
    theirs = reference_mwt.load("models/vgg_masked.py").cifar10_vgg16_bn()
    convs = [m for m in theirs.features if isinstance(m, torch.nn.Conv2d) or hasattr(m, "mask_generator")]
    bns = [m for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    theirs.eval()
    ours = build_model("vgg16_bn", num_classes=10, in_channels=3, width=1.0, key=0)
    gens = {}
    for i, (m, bn) in enumerate(zip(convs, bns)):
        conv = m if isinstance(m, torch.nn.Conv2d) else m.conv
        layer = getattr(ours, f"conv_{i}")
        layer.kernel[...] = _t(conv.weight).transpose(2, 3, 1, 0)
        layer.bias[...] = _t(conv.bias)
        for ours_f, theirs_f in (("scale", "weight"), ("offset", "bias"), ("mean", "running_mean"),
                                 ("var", "running_var")):
            getattr(layer, ours_f)[...] = _t(getattr(bn, theirs_f))
        if i:
            seq = m.mask_generator.mask_generator
            gens[f"conv_{i}"] = {"w1": _t(seq[0].weight).T, "w2": _t(seq[2].weight).T, "b2": _t(seq[2].bias)}
    for ours_fc, idx in (("fc_13", 0), ("fc_14", 3), ("fc_15", 6)):
        getattr(ours, ours_fc).kernel[...] = _t(theirs.classifier[idx].weight).T
        getattr(ours, ours_fc).bias[...] = _t(theirs.classifier[idx].bias)
    assert sorted(gens) == sorted(generator_layers(ours))  # the same 12 generated layers
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x)).numpy()
    got = np.asarray(generator_logits(ours, gens, jnp.asarray(x.transpose(0, 2, 3, 1))))
    # the classifier's N(0, 0.01) init makes logits of ~1e-3: the tolerance follows their scale
    # (without the generators ours differ from theirs by about their size)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def _copy_conv_bn(layer, conv, bn) -> None:
    layer.kernel[...] = _t(conv.weight).transpose(2, 3, 1, 0)
    layer.bias[...] = _t(conv.bias) if conv.bias is not None else 0.0 * layer.bias[...]
    for ours_f, theirs_f in (("scale", "weight"), ("offset", "bias"), ("mean", "running_mean"),
                             ("var", "running_var")):
        getattr(layer, ours_f)[...] = _t(getattr(bn, theirs_f))


def _randomise_bn(model) -> None:
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)


def test_their_mwt_resnet18_with_its_mask_generators_gives_our_logits(reference_mwt):
    """MwT's ResNet-18 (their ``resnet_masked.py``: a generator on every conv but the stem,
    each BN output masked before the residual sum, PyTorch's padding at stride 2) in eval mode:
    our ``resnet18`` with the same weights and our generators gives their logits."""
    from cnnsplit_jax.models import build_model
    from cnnsplit_jax.splitters.mwt import generator_layers
    from cnnsplit_jax.splitters.mwt.training import generator_logits

    torch.manual_seed(5)
    theirs = reference_mwt.load("models/resnet_masked.py").ResNet18(num_classes=10)
    _randomise_bn(theirs)
    theirs.eval()
    ours = build_model("resnet18", num_classes=10, in_channels=3, width=1.0, key=0)
    _copy_conv_bn(ours.conv_0, theirs.conv1, theirs.bn1)
    gens = {}
    for s in range(4):
        for b, block in enumerate(getattr(theirs, f"layer{s + 1}")):
            pairs = [(f"s{s}b{b}_conv1", block.conv1), (f"s{s}b{b}_conv2", block.conv2)]
            if block.downsample is not None:
                pairs.append((f"s{s}b{b}_down", block.downsample[0]))
            for name, m in pairs:
                _copy_conv_bn(getattr(ours, name), m.conv, m.bn)
                seq = m.mask_generator.mask_generator
                gens[name] = {"w1": _t(seq[0].weight).T, "w2": _t(seq[2].weight).T, "b2": _t(seq[2].bias)}
    ours.fc.kernel[...] = _t(theirs.fc.weight).T
    ours.fc.bias[...] = _t(theirs.fc.bias)
    assert sorted(gens) == sorted(generator_layers(ours))  # 19 generated convs: all but the stem
    x = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x)).numpy()
    got = np.asarray(generator_logits(ours, gens, jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)
