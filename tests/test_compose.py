"""Composition: one jitted apply over modules of many models, architectures and kinds equals
each module on its own; extracted and padded forms; labels; the voting rule of concern
modules; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.compose import ClassRef, Composition, Pick, apply, compose, predict_scores
from cnnsplit_jax.models import build_model, mask_points
from cnnsplit_jax.modules.extract import extract_module
from cnnsplit_jax.modules.forward import extracted_scores as module_scores
from cnnsplit_jax.modules.forward import module_outputs
from cnnsplit_jax.modules.heads import vote_scores
from cnnsplit_jax.modules.heads import init_heads
from cnnsplit_jax.modules.module_set import ModuleSet, load_module_set
from cnnsplit_jax.reuse import Source


def _random_set(arch, seed, *, heads=True, mean=0.4, std=0.3, dataset="digits", num_classes=10):
    rng = np.random.default_rng(seed)
    m = build_model(arch, num_classes=num_classes, in_channels=1, width=0.125, key=seed)
    masks = {p.name: (rng.random((num_classes, p.size)) > 0.4).astype(np.float32) for p in mask_points(m)}
    masks[next(iter(masks))][1] = 0.0  # an empty layer: the keep-one rule must hold everywhere
    h = init_heads(jax.random.key(seed), num_classes, num_classes) if heads else None
    return ModuleSet(m, masks, h, {"dataset": dataset, "normalization": {"mean": [mean], "std": [std]},
                                   "class_names": [f"{dataset}{i}" for i in range(num_classes)]})


@pytest.fixture(scope="module")
def random_sets():
    return {
        "sim_a": _random_set("simcnn", 1),
        "sim_b": _random_set("simcnn", 2, mean=0.2, std=0.5),  # same structure, other weights
        "res": _random_set("rescnn", 3, heads=False),  # scored by class logits
        "ince": _random_set("incecnn", 4),
        "sim_logit": _random_set("simcnn", 5, heads=False),  # a SimCNN scored by class logits (CNNSplitter's)
    }


def test_composition_equals_per_module_loop(random_sets):
    s = random_sets
    picks = [Pick(s["sim_a"], 0), Pick(s["sim_b"], 1), Pick(s["res"], 2), Pick(s["sim_a"], 3),
             Pick(s["ince"], 4), Pick(s["res"], 6), Pick(s["sim_a"], 1), Pick(s["sim_logit"], 7)]
    x = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 1)).astype(np.uint8)
    # reference: each module on its own, outside any composition (module_outputs is checked
    # against the base model's plain forward in tests/modules/test_forward.py)
    loop = np.stack([module_outputs(p.module_set, x, classes=[p.source_class])[0][:, 0] for p in picks], 1)
    for form in ("masked", "extracted"):
        for execution in ("vmap", "unrolled"):
            comp = compose(picks, form=form, execution=execution)
            got = np.asarray(jax.jit(apply)(comp, jnp.asarray(x)))
            assert got.shape == (12, 8)
            np.testing.assert_allclose(got, loop, rtol=1e-4, atol=1e-5, err_msg=f"{form}/{execution}")
            # groups: simcnn with heads (two bases), simcnn scored by logits (GradSplitter's and
            # CNNSplitter's modules of one architecture), rescnn, incecnn -> four calls in one apply
            assert len(comp.groups) == 4
    # a pytree a JAX user can flatten, rebuild and vmap
    leaves, tree = jax.tree.flatten(comp)
    again = jax.tree.unflatten(tree, leaves)
    vm = jax.vmap(apply, in_axes=(None, 0))(again, jnp.asarray(x).reshape(2, 6, 32, 32, 1))
    np.testing.assert_allclose(np.asarray(vm).reshape(12, 8), loop, rtol=1e-4, atol=1e-5)


def test_extracted_module_scores_equal_composition(random_sets):
    ms = random_sets["sim_a"]
    c = 3
    mod = extract_module(ms.base, {k: v[c] for k, v in ms.masks.items()}, tuple(h[c] for h in ms.heads), c)
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
    xn = (x.astype(np.float32) / 255 - 0.4) / 0.3
    ref = np.asarray(module_scores(mod, jnp.asarray(xn)))
    comp = compose([Pick(ms, c)], form="extracted", execution="unrolled")
    np.testing.assert_allclose(predict_scores(comp, x)[:, 0], ref, rtol=1e-5, atol=1e-6)
    # normalised input gives the same scores as raw pixels
    compn = compose([Pick(ms, c)], input="normalized")
    np.testing.assert_allclose(np.asarray(apply(compn, jnp.asarray(xn)))[:, 0], ref, rtol=1e-4, atol=1e-5)


def test_padding_to_common_shape_is_exact(random_sets):
    ms = random_sets["res"]
    c = 2
    masks = {k: v[c] for k, v in ms.masks.items()}
    small = extract_module(ms.base, masks, None, c)
    pad = {p.name: p.size for p in mask_points(ms.base)}  # pad all the way to the full width
    big = extract_module(ms.base, masks, None, c, pad_to=pad)
    assert big.model.conv_0.kernel.shape[-1] == ms.base.conv_0.kernel.shape[-1]
    assert small.model.conv_0.kernel.shape[-1] < big.model.conv_0.kernel.shape[-1]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 1)), jnp.float32)
    np.testing.assert_allclose(np.asarray(module_scores(small, x)), np.asarray(module_scores(big, x)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot pad"):
        extract_module(ms.base, masks, None, c, pad_to={k: 1 for k in pad})


def test_labels_map_explicitly(random_sets):
    s = random_sets
    comp = compose([Pick(s["sim_b"], 7, "B", "seven"), Pick(s["res"], 2, "R")])
    assert isinstance(comp, Composition) and comp.num_classes == 2
    assert comp.labels == (ClassRef("B", "digits", 7, "seven"), ClassRef("R", "digits", 2, "digits2"))
    assert comp.class_names == ["seven", "digits2"]


def test_mismatched_inputs_raise_clear_errors(random_sets):
    s = random_sets
    with pytest.raises(ValueError, match="unknown class index 10"):
        compose([Pick(s["sim_a"], 10)])
    with pytest.raises(ValueError, match="different normalisation"):
        compose([Pick(s["sim_a"], 0), Pick(s["sim_b"], 1)], input="normalized")
    rgb = build_model("simcnn", num_classes=10, in_channels=3, width=0.125, key=0)
    rgb_set = ModuleSet(rgb, {p.name: np.ones((10, p.size), np.float32) for p in mask_points(rgb)}, None,
                        {"dataset": "cifar10", "normalization": {"mean": [0.5] * 3, "std": [0.2] * 3}})
    with pytest.raises(ValueError, match="different image shapes"):
        compose([Pick(s["sim_a"], 0), Pick(rgb_set, 1)])
    comp = compose([Pick(s["sim_a"], 0)])
    with pytest.raises(ValueError, match=r"expects images \[B, 32, 32, 1\]"):
        apply(comp, jnp.zeros((2, 28, 28, 1)))
    with pytest.raises(ValueError, match=r"expects images \[B, 32, 32, 1\]"):
        apply(comp, jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="at least one module"):
        compose([])
    with pytest.raises(ValueError, match="form must be"):
        compose([Pick(s["sim_a"], 0)], form="pruned")
    with pytest.raises(ValueError, match="unknown class index"):
        Source("x", s["sim_a"], [0, 12])


def test_concern_modules_compose_with_the_voting_rule(concern_modules, digits):
    ms = load_module_set(concern_modules["none"])
    x = digits.x_test[:64]
    comp = compose([Pick(ms, c) for c in (3, 0, 7)])
    s = np.asarray(jax.jit(apply)(comp, jnp.asarray(x)))
    prob, pos = module_outputs(ms, x)
    np.testing.assert_allclose(s, np.asarray(vote_scores(prob[:, [3, 0, 7]], pos[:, [3, 0, 7]])), atol=1e-5)
    # mixed with a kernel-mask module, the scores are compared directly (no vote)
    kernel = ModuleSet(build_model("simcnn", num_classes=10, in_channels=1, width=0.0625, key=0),
                       {p.name: np.ones((10, p.size), np.float32) for p in mask_points(
                           build_model("simcnn", num_classes=10, in_channels=1, width=0.0625))},
                       init_heads(jax.random.key(0), 10, 10), {"normalization": {"mean": [0.5], "std": [0.3]}})
    mixed = np.asarray(apply(compose([Pick(ms, 3), Pick(kernel, 1)]), jnp.asarray(x)))
    np.testing.assert_allclose(mixed[:, 0], prob[:, 3], atol=1e-5)
