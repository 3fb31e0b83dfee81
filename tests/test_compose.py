"""Composition and reuse: vmapped composition == per-module loop, labels across models,
architectures and datasets, patching, replacement, clear errors."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.cli import main
from cnnsplit_jax.compose import ClassRef, Composition, Pick, apply, compose, predict_scores
from cnnsplit_jax.data import Dataset, DatasetInfo, make_task, parse_task, select_classes
from cnnsplit_jax.evaluate import module_scores_for
from cnnsplit_jax.extract import extract_module, module_scores
from cnnsplit_jax.heads import init_heads
from cnnsplit_jax.masks import mask_points
from cnnsplit_jax.models import build_model
from cnnsplit_jax.module_set import ModuleSet, load_module_set
from cnnsplit_jax.reuse import Source, patch_scores, select_picks

FASHION = Path("/usr/share/datasets/fashion-mnist")


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
    }


def test_composition_equals_per_module_loop(random_sets):
    s = random_sets
    picks = [Pick(s["sim_a"], 0), Pick(s["sim_b"], 1), Pick(s["res"], 2), Pick(s["sim_a"], 3),
             Pick(s["ince"], 4), Pick(s["res"], 6), Pick(s["sim_a"], 1)]
    x = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 1)).astype(np.uint8)
    # reference: each module on its own, outside any composition
    loop = np.stack([module_scores_for(p.module_set, x)[:, p.source_class] for p in picks], 1)
    for form in ("masked", "extracted"):
        for execution in ("vmap", "unrolled"):
            comp = compose(picks, form=form, execution=execution)
            got = np.asarray(jax.jit(apply)(comp, jnp.asarray(x)))
            assert got.shape == (12, 7)
            np.testing.assert_allclose(got, loop, rtol=1e-4, atol=1e-5, err_msg=f"{form}/{execution}")
            # groups: simcnn (two bases), rescnn, incecnn -> three calls inside the one apply
            assert len(comp.groups) == 3
    # a pytree a JAX user can flatten, rebuild and vmap
    leaves, tree = jax.tree.flatten(comp)
    again = jax.tree.unflatten(tree, leaves)
    vm = jax.vmap(apply, in_axes=(None, 0))(again, jnp.asarray(x).reshape(2, 6, 32, 32, 1))
    np.testing.assert_allclose(np.asarray(vm).reshape(12, 7), loop, rtol=1e-4, atol=1e-5)


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
    with pytest.raises(ValueError, match="different input channels"):
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


def test_task_specs_and_class_selection(digits):
    assert parse_task("digits:0-2,9+digits:5") == [("digits", [0, 1, 2, 9]), ("digits", [5])]
    sub = select_classes(digits, [7, 3])
    assert sub.info.class_names == ("7", "3")
    assert set(np.unique(sub.y_train)) == {0, 1}
    assert (sub.y_train == 0).sum() == (digits.y_train == 7).sum()
    with pytest.raises(ValueError, match="unknown class index"):
        select_classes(digits, [3, 11])


def test_cross_dataset_task_routes_labels(digits):
    """Two datasets (digits and an inverted copy): each task class is served by a module
    of its own dataset, and the chosen module indices follow the module sets' class order."""
    inv_info = DatasetInfo("digits_inv", digits.info.class_names, 1, (0.66,), (0.3,))
    inv = Dataset(255 - digits.x_train, digits.y_train, 255 - digits.x_test, digits.y_test, inv_info)
    task = make_task([(digits, [1, 2]), (inv, [2, 5])])
    assert task.sources == (("digits", 1), ("digits", 2), ("digits_inv", 2), ("digits_inv", 5))
    assert task.ds.info.num_classes == 4 and task.ds.info.channels == 1
    assert len(task.y_eval) + len(task.ds.y_test) == sum(np.isin(digits.y_test, [1, 2])) + sum(np.isin(digits.y_test, [2, 5]))
    a = _random_set("simcnn", 5)
    b = _random_set("rescnn", 6, dataset="digits_inv")
    b.meta["sources"] = [["digits_inv", c] for c in (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)]  # reversed order
    picks, chosen = select_picks([Source("A", a), Source("B", b)], task)
    assert chosen == [0, 0, 1, 1]
    assert [p.source_class for p in picks] == [1, 2, 7, 4]
    with pytest.raises(ValueError, match="no module for class"):
        select_picks([Source("A", a)], task)


@pytest.fixture(scope="module")
def rescnn_modules(tmp_path_factory):
    """A second, weaker model of another architecture on digits (Dirichlet subsample)."""
    d = tmp_path_factory.mktemp("rescnn")
    assert main(["train", "--model", "rescnn", "--dataset", "digits", "--width", "0.125", "--epochs", "10",
                 "--batch-size", "64", "--lr", "0.05", "--lr-milestones", "0.75", "--dirichlet-alpha", "1",
                 "--dirichlet-min-size", "20", "--seed", "1", "--out", str(d / "run")]) == 0
    assert main(["split", "--model-dir", str(d / "run"), "--out", str(d / "mods"), "--head-epochs", "1",
                 "--modularity-epochs", "7", "--lr-modularity", "0.05"]) == 0
    return d / "mods"


def test_compose_cli_picks_best_f1_across_models_and_architectures(digits_modules, rescnn_modules, tmp_path, digits):
    out = tmp_path / "comp"
    assert main(["compose", "--modules", str(digits_modules), "--modules", str(rescnn_modules),
                 "--out", str(out)]) == 0
    res = json.loads((out / "compose.json").read_text())
    assert len(res["f1"]) == len(res["precision"]) == len(res["recall"]) == 10
    assert (out / "confusion.png").stat().st_size > 1000
    cf1 = res["candidate_f1"]
    for c, ch in enumerate(res["chosen"]):  # per class, the module with the best F1 wins
        best = max(cf1, key=lambda src: (cf1[src][str(c)], src == str(digits_modules)))
        assert cf1[ch["source"]][str(c)] == cf1[best][str(c)]
    # the accurate-model scenario: at least as good as the weaker source model, close to the best
    bases = [s["base_accuracy"] for s in res["sources"]]
    assert res["accuracy"] >= min(bases) and res["accuracy"] >= max(bases) - 0.05
    # the JSON numbers are those of the composition of the chosen modules
    sets = {str(digits_modules): load_module_set(digits_modules), str(rescnn_modules): load_module_set(rescnn_modules)}
    picks = [Pick(sets[ch["source"]], ch["module"]) for ch in res["chosen"]]
    task = make_task([(digits, list(range(10)))])
    pred = predict_scores(compose(picks), task.ds.x_test).argmax(-1)
    assert res["accuracy"] == pytest.approx(float((pred == task.ds.y_test).mean()))
    # a subset of classes given in another order: labels are the sorted covered classes
    assert main(["compose", "--modules", f"{digits_modules}:7,3", "--modules", f"{digits_modules}:1",
                 "--out", str(out / "sub")]) == 0
    sub = json.loads((out / "sub" / "compose.json").read_text())
    assert sub["class_names"] == ["1", "3", "7"] and sub["images"] == int(np.isin(task.ds.y_test, [1, 3, 7]).sum())
    assert sub["accuracy"] > 0.9
    # unknown class index and class-count mismatch are clear CLI errors
    assert main(["compose", "--modules", f"{digits_modules}:12", "--out", str(out / "x")]) == 2
    assert main(["compose", "--modules", str(digits_modules), "--dataset", "cifar10", "--out", str(out / "y")]) == 2


def test_patch_improves_weak_models_target_class(digits_modules, tmp_path):
    weak = tmp_path / "weak"
    # a deliberately weak model: CNNSplitter's weak SimCNN, narrow, trained for 2 epochs on a
    # task whose last class (the target) is digit 3
    assert main(["train", "--model", "simcnn_weak", "--recipe", "weak", "--dataset", "digits:0-2,4-9,3",
                 "--width", "0.125", "--epochs", "2", "--batch-size", "64", "--out", str(weak)]) == 0
    out = tmp_path / "patch"
    assert main(["patch", "--weak", str(weak), "--modules", str(digits_modules), "--target-class", "3",
                 "--out", str(out)]) == 0
    res = json.loads((out / "patch.json").read_text())
    for part in ("before", "after"):
        assert set(res[part]) >= {"precision", "recall", "f1", "accuracy"}
    # measured: target-class F1 0.40 -> 0.91 with the demo's modules
    assert res["after"]["f1"] >= res["before"]["f1"] + 0.2
    assert res["after"]["accuracy"] >= res["before"]["accuracy"] - 0.05
    assert (out / "confusion_before.png").stat().st_size > 1000
    # the module must recognise the weak model's target class
    assert main(["patch", "--weak", str(weak), "--modules", str(digits_modules), "--target-class", "4",
                 "--out", str(tmp_path / "bad")]) == 2


def test_patch_rule_matches_reference():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.45, 0.05]])
    m = np.array([0.2, 0.6, 1.0])
    got = patch_scores(probs, m, 0.2, 1.0)
    np.testing.assert_allclose(got, [[0.7, 0.2, 0.0], [0.1, 0.1, 0.5], [0.5, 0.45, 1.0]])
    assert got.argmax(-1).tolist() == [0, 2, 2]
    with pytest.raises(ValueError, match="range"):
        patch_scores(probs, m, 1.0, 1.0)


def test_replace_swaps_one_module(digits_modules, rescnn_modules, tmp_path):
    out = tmp_path / "rep"
    assert main(["replace", "--modules", str(digits_modules), "--with", str(rescnn_modules),
                 "--class", "3", "--out", str(out)]) == 0
    res = json.loads((out / "replace.json").read_text())
    assert res["old_source"] == str(digits_modules) and res["new_source"] == str(rescnn_modules)
    assert res["accuracy_change"] == pytest.approx(res["after"]["accuracy"] - res["before"]["accuracy"])
    # only class 3's column changed: the other modules' F1 may move (fewer/more images taken
    # by class 3) but the composition of the untouched modules is the same as before
    ms = load_module_set(digits_modules)
    assert res["before"]["accuracy"] == pytest.approx(
        json.loads((digits_modules / "split.json").read_text())["composed_accuracy"], abs=1e-9)
    assert ms.num_modules == 10


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian dataset-fashion-mnist not installed")
def test_new_task_from_fashion_and_digits_modules(digits_modules, tmp_path):
    f = tmp_path / "fashion"
    assert main(["train", "--model", "simcnn", "--dataset", "fashion_mnist:0,1,7", "--width", "0.125",
                 "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--out", str(f / "run")]) == 0
    assert main(["split", "--model-dir", str(f / "run"), "--out", str(f / "mods"), "--head-epochs", "1",
                 "--modularity-epochs", "2", "--train-subset", "2000", "--lr-modularity", "0.05"]) == 0
    out = tmp_path / "new"
    assert main(["compose", "--modules", f"{f / 'mods'}:0,2", "--modules", f"{digits_modules}:3,4",
                 "--baseline-epochs", "1", "--out", str(out)]) == 0
    res = json.loads((out / "compose.json").read_text())
    assert res["task"] == "fashion_mnist:0,7+digits:3,4"
    assert res["class_names"] == ["t-shirt/top", "sneaker", "3", "4"]
    assert res["chosen"][1]["module"] == 2 and res["chosen"][1]["dataset_class"] == 7
    assert res["accuracy"] > 0.8 and res["baseline"]["accuracy"] > 0.8
    assert res["baseline"]["train_seconds"] > 0 and "training_seconds_saved" in res
