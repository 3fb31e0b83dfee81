"""The one forward of modules: every kind against an independent per-module computation
(the base model's own forward with one module's masks, or its own node_forward), and the
concern kind's probability and vote against hand-written rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnsplit_jax.data import normalize
from cnnsplit_jax.models import build_model, mask_points
from cnnsplit_jax.modules.extract import effective_masks
from cnnsplit_jax.modules.forward import (KINDS, Pick, default_chunk, masked_logits, module_outputs,
                                          node_logits, positive_probability, vote_scores)
from cnnsplit_jax.modules.heads import head_scores, init_heads
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
    inactive = {nd.name: rng.random((3, *nd.shape)) > 0.7 for nd in model.nodes()}
    hw = rng.normal(size=(3, model.fc_in, 2)).astype(np.float32)
    hb = rng.normal(size=(3, 2)).astype(np.float32)
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
        poss.append(l2[:, 0] > l2[:, 1])
    scores, pos = module_outputs(ms, x, form="extracted")  # concern sets have one form only
    np.testing.assert_allclose(scores, np.stack(probs, 1), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pos, np.stack(poss, 1))
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


def _vote_by_hand(prob, positive):
    """Pan & Rajan's composition, as stated: the single positive module wins; otherwise the
    module with the highest positive-class probability."""
    out = []
    for p, q in zip(prob, positive):
        idx = [i for i, b in enumerate(q) if b]
        out.append(idx[0] if len(idx) == 1 else int(np.argmax(p)))
    return np.asarray(out)


def test_positive_probability_and_voting_rule():
    l2 = jnp.asarray([[2.0, -1.0], [0.5, 3.0]])
    want = jax.nn.softmax(jnp.asarray([[2.0, -1.0, 0, 0, 0], [0.5, 3.0, 0, 0, 0]]), -1)[:, 0]
    np.testing.assert_allclose(positive_probability(l2, 5), want, rtol=1e-6)
    prob = np.array([[0.2, 0.9, 0.6], [0.2, 0.9, 0.6], [0.2, 0.9, 0.6]])
    pos = np.array([[True, False, False], [True, True, False], [False, False, False]])
    np.testing.assert_array_equal(np.asarray(vote_scores(prob, pos)).argmax(-1), [0, 1, 1])
    rng = np.random.default_rng(0)
    p, q = rng.random((200, 7)), rng.random((200, 7)) > 0.8
    np.testing.assert_array_equal(np.asarray(vote_scores(jnp.asarray(p), jnp.asarray(q))).argmax(-1),
                                  _vote_by_hand(p, q))
    assert KINDS["concern"].combine is vote_scores and KINDS["masked"].combine is None


def test_stack_refuses_a_form_a_set_cannot_run():
    ms = _kernel_set(True)
    with pytest.raises(ValueError, match="kernel module sets run as"):
        ms.forward_form("concern")
    group = KINDS["masked"].stack([Pick(ms, 2), Pick(ms, 0)])
    assert group.kind == "masked" and group.classes.tolist() == [2, 0]
