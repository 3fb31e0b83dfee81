"""The one forward of modules: every kind against an independent per-module computation
(the base model's own forward with one module's masks, or its own node_forward), and the
concern kind's probability and vote against hand-written rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.data import normalize
from cnnsplit_jax.models import build_model, mask_points
from cnnsplit_jax.models import effective_masks
from cnnsplit_jax.modules.forward import FORWARD_FORMS, Pick, default_chunk, masked_logits, module_outputs, node_logits
from cnnsplit_jax.modules.heads import concern_positive, head_scores, init_heads, positive_probability, vote_scores
from cnnsplit_jax.modules.module_set import ConcernModuleSet, ModuleSet


def _kernel_set(heads: bool, seed=0):
    rng = np.random.default_rng(seed)
    m = build_model("simcnn", num_classes=4, in_channels=1, width=0.0625, key=seed)
    masks = {p.name: (rng.random((4, p.size)) > 0.3).astype(np.float32) for p in mask_points(m)}
    masks["conv_2"][1] = 0.0  # an empty layer: the keep-one rule
    h = init_heads(jax.random.key(seed), 4, 4) if heads else None
    return ModuleSet(m, masks, h, {"normalization": {"mean": [0.3], "std": [0.2]}})


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("form", ["masked", "extracted"])
def test_kernel_kinds_equal_each_module_on_its_own(heads, form):
    ms = _kernel_set(heads)
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
    xn = jnp.asarray(normalize(x, (0.3,), (0.2,)))
    eff = effective_masks(ms.masks)
    want_s, want_p = [], []
    forward = jax.jit(lambda m, masks: m(xn, masks))
    for c in range(4):  # the base model's plain forward under module c's masks
        logits = forward(ms.base, {k: jnp.asarray(v[c]) for k, v in eff.items()})
        if heads:
            s = head_scores(type(ms.heads)(*(h[c:c + 1] for h in ms.heads)), logits[:, None])[:, 0]
            p = s > 0.5
        else:
            s, p = logits[:, c], logits.argmax(-1) == c
        want_s.append(np.asarray(s))
        want_p.append(np.asarray(p))
    scores, pos = module_outputs(ms, x, form=form, batch_size=2)  # batches of 2, last one padded
    np.testing.assert_allclose(scores, np.stack(want_s, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pos, np.stack(want_p, 1))
    # a subset of modules, in another order
    s2, _ = module_outputs(ms, x, form=form, classes=[3, 0])
    np.testing.assert_allclose(s2, np.stack(want_s, 1)[:, [3, 0]], rtol=1e-4, atol=1e-5)


def test_concern_kind_equals_node_forward_per_module():
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.125, key=3)
    rng = np.random.default_rng(2)
    inactive = {nd.name: rng.random((3, *nd.shape)) > 0.7 for nd in model.nodes("sum")}
    hw = rng.normal(size=(3, model.fc_in, 2)).astype(np.float32)
    hb = rng.normal(size=(3, 2)).astype(np.float32)
    hb[:, 0] += np.asarray([2.0, 0.0, -2.0], np.float32)  # positive and negative decisions both occur
    ms = ConcernModuleSet(model, inactive, hw, hb, np.zeros((3, model.fc_in), bool),
                          {"normalization": {"mean": [0.5], "std": [0.25]}})
    x = rng.integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)
    xn = jnp.asarray(normalize(x, (0.5,), (0.25,)))
    probs, poss = [], []
    node_forward = jax.jit(lambda m, keep: m.node_forward(xn, keep))
    for c in range(3):
        keep = {k: jnp.asarray(1.0 - v[c]) for k, v in inactive.items()}
        l2 = np.asarray(node_forward(model, keep)) @ hw[c] + hb[c]
        # the lab's K-column output: [l_c, l_uc, 0, ...] through a softmax, first entry
        full = np.concatenate([l2, np.zeros((4, 1))], 1)
        probs.append(np.exp(full[:, 0]) / np.exp(full).sum(1))
        poss.append(full.argmax(1) == 0)  # the lab: positive when the concerned column is the argmax
    scores, pos = module_outputs(ms, x, form="extracted")  # concern sets have one form only
    np.testing.assert_allclose(scores, np.stack(probs, 1), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pos, np.stack(poss, 1))
    assert 0 < np.mean(poss) < 1
    # node_logits in vmapped groups equals one vmap
    keep = {k: jnp.asarray(1.0 - v) for k, v in inactive.items()}
    np.testing.assert_allclose(node_logits(model, keep, hw, hb, xn, chunk=2), node_logits(model, keep, hw, hb, xn),
                               rtol=1e-5, atol=1e-5)


def test_masked_logits_loops_agree():
    model = build_model("rescnn", num_classes=3, in_channels=1, width=0.0625, key=4)
    rng = np.random.default_rng(5)
    masks = {p.name: jnp.asarray(rng.random((7, p.size)) > 0.5, jnp.float32) for p in mask_points(model)}
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
    one = masked_logits(model, masks, x)
    for chunk, loop in ((3, "map"),):  # the unrolled groups are checked by the GradSplitter step tests
        np.testing.assert_allclose(masked_logits(model, masks, x, chunk, loop), one, rtol=1e-5, atol=1e-5)
    assert default_chunk(7, 3) == 3 and default_chunk(2, 5) == 2


def _lab_composition(l2, k):
    """The lab's composition, written the way its reuse script runs it: module c's output is
    K columns (concerned column c, the unconcerned column in another slot, zeros elsewhere);
    it votes for c when the argmax over the K columns is c; one vote wins, several go to the
    most confident voter, none to the most confident module."""
    preds = []
    for row in np.asarray(l2, np.float64):  # [n, 2]
        probs, votes = [], []
        for c, (lc, luc) in enumerate(row):
            out = np.zeros(k)
            out[c], out[(c + 1) % k] = lc, luc
            e = np.exp(out - out.max())
            probs.append(e[c] / e.sum())
            votes.append(int(np.argmax(out)) == c)
        idx = [c for c in range(len(row)) if votes[c]]
        if len(idx) == 1:
            preds.append(idx[0])
        elif idx:
            preds.append(max(idx, key=lambda c: probs[c]))
        else:
            preds.append(int(np.argmax(probs)))
    return np.asarray(preds)


def test_positive_probability_decision_and_vote_follow_the_lab():
    l2 = jnp.asarray([[2.0, -1.0], [0.5, 3.0]])
    want = jax.nn.softmax(jnp.asarray([[2.0, -1.0, 0, 0, 0], [0.5, 3.0, 0, 0, 0]]), -1)[:, 0]
    np.testing.assert_allclose(positive_probability(l2, 5), want, rtol=1e-6)
    # l_c > l_uc is not enough: a negative l_c loses to the zero columns (unless K == 2)
    neg = jnp.asarray([[-0.5, -2.0], [1.0, 0.5], [0.3, 0.7]])
    np.testing.assert_array_equal(concern_positive(neg, 5), [False, True, False])
    np.testing.assert_array_equal(concern_positive(neg, 2), [True, True, False])
    # several positives and a more confident negative module: the lab picks among the positives
    prob = jnp.asarray([[0.2, 0.9, 0.6]])
    assert int(np.asarray(vote_scores(prob, jnp.asarray([[True, False, True]]))).argmax(-1)[0]) == 2
    assert int(np.asarray(vote_scores(prob, jnp.asarray([[False, False, False]]))).argmax(-1)[0]) == 1
    assert int(np.asarray(vote_scores(prob, jnp.asarray([[True, False, False]]))).argmax(-1)[0]) == 0
    rng = np.random.default_rng(0)
    for k in (2, 7):
        l2 = jnp.asarray(rng.normal(size=(2000, k, 2)), jnp.float32)
        pos = concern_positive(l2, k)
        assert 0 < float(pos.mean()) < 1
        if k > 2:  # several voters with a more confident non-voter happen here
            p = np.asarray(positive_probability(l2, k))
            several = (np.asarray(pos).sum(-1) > 1) & (p.argmax(-1) != np.where(pos, p, -1).argmax(-1))
            assert several.sum() > 5
        got = np.asarray(vote_scores(positive_probability(l2, k), pos)).argmax(-1)
        np.testing.assert_array_equal(got, _lab_composition(l2, k))
    assert FORWARD_FORMS["concern"].combine is vote_scores and FORWARD_FORMS["masked"].combine is None


def test_stack_refuses_a_form_a_set_cannot_run():
    ms = _kernel_set(True)
    with pytest.raises(ValueError, match="kernel module sets run as"):
        ms.forward_form("concern")
    group = FORWARD_FORMS["masked"].stack([Pick(ms, 2), Pick(ms, 0)])
    assert group.form == "masked" and group.classes.tolist() == [2, 0]
