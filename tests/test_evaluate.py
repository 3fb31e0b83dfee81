"""Evaluation on its own: metrics against hand-computed values (ties and empty predictions
included), and a module set's report against its own outputs."""

import json

import numpy as np
import pytest

from cnnsplit_jax.evaluate import (binary_metrics, classification_report, composed_scores, evaluate_module_set,
                                   jaccard_matrix, module_prf, topk_accuracy)
from cnnsplit_jax.models import build_model, mask_points, total_kernels
from cnnsplit_jax.modules.forward import module_outputs
from cnnsplit_jax.modules.module_set import ModuleSet, load_module_set
from cnnsplit_jax.pipeline import run_data
from cnnsplit_jax.train import accuracy


def test_binary_metrics_by_hand():
    pred = np.array([True, True, False, False, True])
    truth = np.array([True, False, True, False, True])
    p, r, f = binary_metrics(pred, truth)  # tp 2, fp 1, fn 1
    assert (p, r) == (2 / 3, 2 / 3) and f == pytest.approx(2 / 3)
    # 0/0 is undefined (None: JSON null), never 0: no positive prediction, no positive image,
    # or precision + recall = 0 (the F1 of a module that fires only on other classes)
    assert binary_metrics(np.zeros(3, bool), np.zeros(3, bool)) == (None, None, None)
    assert binary_metrics(np.zeros(3, bool), np.ones(3, bool)) == (None, 0.0, None)
    assert binary_metrics(np.array([1, 0, 0], bool), np.array([0, 1, 0], bool)) == (0.0, 0.0, None)
    assert binary_metrics(np.ones(2, bool), np.zeros(2, bool)) == (0.0, None, None)
    prf = module_prf(np.array([[True, False], [True, True], [False, True]]), np.array([0, 1, -1]))
    assert prf[0] == (0.5, 1.0, pytest.approx(2 / 3)) and prf[1] == (0.5, 1.0, pytest.approx(2 / 3))


def test_mean_of_defined_values():
    from cnnsplit_jax.evaluate import mean_defined

    assert mean_defined([0.5, None, 1.0, float("nan")]) == 0.75
    assert mean_defined([None, None]) is None and mean_defined([]) is None


def test_topk_accuracy_with_ties_and_classification_report():
    s = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.3], [0.9, 0.0, 0.1]])
    y = np.array([2, 2, 0])
    assert topk_accuracy(s, y, 1) == pytest.approx(1 / 3)  # row 0 ranks class 2 second
    # row 1's three-way tie ranks the lower classes first: class 2 is not in its top 2
    assert topk_accuracy(s, y, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(s, y, 5) == 1.0 and topk_accuracy(s[:0], y[:0]) == 0.0
    rep = classification_report(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ["a", "b", "c"])
    assert rep["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]] and rep["accuracy"] == 0.75
    assert rep["precision"] == [1.0, 0.5, 1.0] and rep["recall"] == [1.0, 1.0, 0.5]


def test_jaccard_of_kept_kernels_by_hand():
    m = build_model("rescnn", num_classes=2, in_channels=1, width=0.0625, key=0)  # 4..32 channels
    masks = {p.name: np.zeros((2, p.size), np.float32) for p in mask_points(m)}
    masks["conv_0"][0, :3] = 1  # module 0 keeps conv_0 kernels 0-2; module 1 kernels 1-3
    masks["conv_0"][1, 1:4] = 1
    ms = ModuleSet(m, masks, None, {"normalization": {"mean": [0.5], "std": [0.2]}})
    # every other layer is empty: the keep-one rule keeps its kernel 0 in both modules; the
    # tied points (conv_1/3, 5/7, 9/11) count once per gated conv: 12 shared convs
    shared, only = 12 - 1, 1  # layers other than conv_0 (kernel 0 each); conv_0: 2 shared, 1 own
    inter, union = shared + 2, shared + 2 + 2 * only
    np.testing.assert_allclose(jaccard_matrix(ms), [[1, inter / union], [inter / union, 1]])
    ret = ms.structure(flops=False)
    assert ret["kernel_retention"] == pytest.approx([(3 + shared) / total_kernels(m)] * 2)


def test_report_of_a_module_set_matches_its_outputs(digits_modules, digits_run):
    ms = load_module_set(digits_modules)
    rd = run_data(ms.meta)
    res = evaluate_module_set(ms, rd.eval_split, rd.test_split, rd.ds.info, flops=False)
    (xe, ye), (xt, yt) = rd.eval_split, rd.test_split
    scores, pos = module_outputs(ms, xt)
    assert res["composed_accuracy"] == pytest.approx(float((scores.argmax(-1) == yt).mean()))
    assert np.array_equal(composed_scores(ms, scores, pos), scores)  # kernel sets: plain argmax
    from cnnsplit_jax.checkpoint import load_model

    base, _ = load_model(digits_run)
    assert res["base_accuracy"] == pytest.approx(accuracy(base, xt, yt, rd.ds.info))
    _, pos_e = module_outputs(ms, xe)
    for c in (0, 7):
        assert res["module_f1"][c] == pytest.approx(binary_metrics(pos_e[:, c], ye == c)[2])
    assert res["accuracy_loss"] == pytest.approx(res["base_accuracy"] - res["composed_accuracy"])
    assert res["eval_images"] == len(ye) == 72 and res["test_images"] == len(yt) == 287
    # the whole test set (both splits), from separate passes over each split
    whole = res["whole_test_set"]
    scores_e, _ = module_outputs(ms, xe)
    y_all = np.concatenate([ye, yt])
    composed_all = np.concatenate([scores_e.argmax(-1), scores.argmax(-1)])
    assert whole["images"] == 359 and whole["composed_accuracy"] == pytest.approx(float((composed_all == y_all).mean()))
    assert whole["base_accuracy"] == pytest.approx(accuracy(base, np.concatenate([xe, xt]), y_all, rd.ds.info))
    assert whole["accuracy_loss"] == pytest.approx(whole["base_accuracy"] - whole["composed_accuracy"])
    split = json.loads((digits_modules / "split.json").read_text())
    assert res["composed_accuracy"] == split["composed_accuracy"]
