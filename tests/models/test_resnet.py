"""CIFAR ResNet-20/32/56 (Pan & Rajan's models): depths, nodes, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnsplit_jax.models import build_model
from cnnsplit_jax.models.resnet import RESIDUAL_MAPPINGS


def nnx_params(model):
    return nnx.state(model, nnx.Param)


def test_resnet_depths_and_nodes():
    for arch, blocks in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9)):
        m = build_model(arch, num_classes=10, in_channels=3, width=0.25)
        convs = [s for s in m.topology if not s.name.endswith("_short")]
        assert len(convs) + 1 == 6 * blocks + 2  # conv layers + the dense layer
        assert m.nodes() == m.nodes("conv")  # the one default mapping, concern identification's
        nodes = m.nodes("sum")
        assert len(nodes) == 1 + 6 * blocks
        assert nodes[-1].shape == (8, 8, 16) and nodes[0].shape == (32, 32, 4)
        conv = m.nodes("conv")  # conv outputs only: conv1, conv2 per block, the 2 projections
        assert len(conv) == 1 + 6 * blocks + 2 and conv[-1].name == f"s2b{blocks - 1}_conv2"
        assert [n.name for n in conv if n.name.endswith("_short")] == ["s1b0_short", "s2b0_short"]
        ident = m.nodes("conv_identity")  # + the identity shortcut's branch in every other block
        assert len(ident) == 1 + 9 * blocks and [n.kind for n in ident[-2:]] == ["branch", "branch"]
        assert ident[-1].convs == () and ident[1 + 3 * blocks + 2].convs == ("s1b0_short",)
        assert {n.name for n in ident} - {n.name for n in conv} == {
            f"s{s}b{b}_short" for s in range(3) for b in range(blocks) if s == 0 or b > 0}
        assert len({frozenset(n.name for n in m.nodes(r)) for r in RESIDUAL_MAPPINGS}) == 3  # names tell them apart
        assert m.feature_nodes("conv") == (f"s2b{blocks - 1}_conv2",)
        assert m.feature_nodes("conv_identity") == (f"s2b{blocks - 1}_conv2", f"s2b{blocks - 1}_short")
        x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
        feats, rec = m.node_forward(x, record=True)
        np.testing.assert_allclose(m.fc(feats), m(x), atol=1e-5)
        assert {k: v.shape[1:] for k, v in rec.items()} == {n.name: n.shape for n in nodes + ident}
    full = build_model("resnet20", num_classes=10, in_channels=3)
    assert sum(p.size for p in jax.tree.leaves(nnx_params(full))) == 271690  # Keras resnet_v1 20, no BN
    with pytest.raises(ValueError, match="concern"):
        full(jnp.zeros((1, 32, 32, 3)), {"conv_0": jnp.ones(16)})


