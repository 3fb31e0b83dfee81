"""The papers' CNNs: SimCNN, ResCNN, InceCNN (GradSplitter's models), CNNSplitter's own SimCNN /
ResCNN (no BatchNorm; ``simcnn_cnnsplitter``, ``rescnn_cnnsplitter``), and CNNSplitter's weak
SimCNN / ResCNN used in the patching experiments (no BatchNorm; CIFAR-10 and SVHN variants).

Each class only states its topology (``_base_topology``), its FC head and its forward order;
masking, recording and checks live in ``base.MaskedCNN``.
"""

from __future__ import annotations

import jax.numpy as jnp

from .base import ConvSpec, Dense, MaskedCNN, dense_chain, dropout, scaled
from .conv import max_pool_2x2

__all__ = ["SimCNN", "ResCNN", "InceCNN", "SimCNNCNNSplitter", "ResCNNCNNSplitter", "SimCNNWeak", "ResCNNWeak",
           "SimCNNSVHNWeak", "ResCNNSVHNWeak", "CNNS"]


class SimCNN(MaskedCNN):
    """VGG-16-style: 13 conv (3x3) in 5 pooled stages, FC 512->4096->4096->N (dropout 0.5)."""

    arch = "simcnn"
    conv_init = "vgg"
    _channels = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    _pool_after = (1, 3, 6, 9, 12)
    fc_input_layers = ("conv_12",)
    fc_layers = ("fc_13", "fc_14", "fc_15")

    def __init__(self, num_classes=10, in_channels=3, width=1.0, *, fc_hidden=None, channels=None, rngs):
        """``fc_hidden``: width of fc_13/fc_14; default ``scaled(4096, width)`` (4096 at width 1)."""
        self.fc_hidden = int(fc_hidden) if fc_hidden else scaled(4096, width)
        super().__init__(num_classes, in_channels, width, channels=channels, rngs=rngs)

    def config(self) -> dict:
        return {**super().config(), "fc_hidden": self.fc_hidden}

    @classmethod
    def _base_topology(cls):
        sizes = (32, 32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2)
        return tuple(
            ConvSpec(f"conv_{i}", 3, c, (f"conv_{i - 1}",) if i else (), f"conv_{i}", sizes[i])
            for i, c in enumerate(cls._channels)
        )

    def _build_head(self, rngs):
        self.fc_13 = Dense(self.fc_in, self.fc_hidden, rngs=rngs)
        self.fc_14 = Dense(self.fc_hidden, self.fc_hidden, rngs=rngs)
        self.fc_15 = Dense(self.fc_hidden, self.num_classes, rngs=rngs)

    def _body(self, x, masks, train, rec=None):
        for i in range(13):
            x = self._layer(f"conv_{i}", x, masks, train, rec)
            if i in self._pool_after:
                x = max_pool_2x2(x)
        return x.reshape(x.shape[0], -1)

    def _head(self, h, train, key):
        return dense_chain(h, (self.fc_13, self.fc_14, self.fc_15), train=train, key=key, rate=0.5,
                           dropout_before=(0, 1))


class ResCNN(MaskedCNN):
    """12 conv (3x3) with identity shortcuts around (2,3), (6,7), (10,11); FC 512->N.

    The second conv of each pair shares the mask of the conv whose output is the shortcut
    (conv_3 uses conv_1's, conv_7 conv_5's, conv_11 conv_9's), so 9 mask points gate 12 convs.
    """

    arch = "rescnn"
    _channels = (64, 128, 128, 128, 256, 512, 512, 512, 512, 512, 512, 512)
    _tied = {3: 1, 7: 5, 11: 9}
    fc_input_layers = ("conv_11",)
    fc_layers = ("fc_12",)

    @classmethod
    def _base_topology(cls):
        sizes = (32, 32, 16, 16, 16, 8, 4, 4, 4, 2, 1, 1)
        specs = []
        for i, c in enumerate(cls._channels):
            mask = f"conv_{cls._tied.get(i, i)}"
            specs.append(ConvSpec(f"conv_{i}", 3, c, (f"conv_{i - 1}",) if i else (), mask, sizes[i]))
        return tuple(specs)

    def _build_head(self, rngs):
        self.fc_12 = Dense(self.fc_in, self.num_classes, rngs=rngs)

    record_in_layer = False

    def _body(self, x, masks, train, rec=None):
        L = lambda n, h: self._layer(n, h, masks, train, rec)  # noqa: E731
        R = (lambda p, v: None) if rec is None else rec.__setitem__  # noqa: E731
        x = L("conv_0", x)
        R("conv_0", x)
        for i in (1, 5, 9):  # three stages: [a pooled conv,] a pooled conv i, the residual pair (i+1, i+2)
            if i > 1:
                x = max_pool_2x2(L(f"conv_{i - 1}", x))
                R(f"conv_{i - 1}", x)
            r = max_pool_2x2(L(f"conv_{i}", x))
            h = L(f"conv_{i + 1}", r)
            R(f"conv_{i + 1}", h)
            x = L(f"conv_{i + 2}", h) + r
            R(f"conv_{i}", x)  # the tied pair (conv_i, conv_{i+2}): the residual sum
        return x.reshape(x.shape[0], -1)

    head_dropout = 0.5

    def _head(self, h, train, key):
        if train:
            h = dropout(h, self.head_dropout, key)
        return self.fc_12(h)


class SimCNNCNNSplitter(SimCNN):
    """CNNSplitter's SimCNN (ASE 2022): SimCNN's 13 convs without BatchNorm, FC 512 -> 512 -> N
    (``fc_hidden`` defaults to ``scaled(512, width)``), dropout 0.5 before fc_13 and fc_14."""

    arch = "simcnn_cnnsplitter"
    batch_norm = False

    def __init__(self, num_classes=10, in_channels=3, width=1.0, *, fc_hidden=None, channels=None, rngs):
        super().__init__(num_classes, in_channels, width, fc_hidden=fc_hidden or scaled(512, width),
                         channels=channels, rngs=rngs)


class ResCNNCNNSplitter(ResCNN):
    """CNNSplitter's ResCNN (ASE 2022): ResCNN's 12 convs without BatchNorm, dropout 0.4 before
    the FC layer."""

    arch = "rescnn_cnnsplitter"
    batch_norm = False
    head_dropout = 0.4


class InceCNN(MaskedCNN):
    """3 stem convs then 3 inception blocks of parallel 1x1 / 3x3 / 5x5 branches; GAP; FC->N.

    Each branch has its own mask; a block's input is the concat (a, b, c) of the previous
    block's masked branches. Dropout 0.4 before the FC.
    """

    arch = "incecnn"
    fc_input_layers = ("conv_9", "conv_10", "conv_11")
    fc_layers = ("fc_12",)

    @classmethod
    def _base_topology(cls):
        specs = [
            ConvSpec("conv_0", 3, 64, (), "conv_0", 32),
            ConvSpec("conv_1", 3, 128, ("conv_0",), "conv_1", 32),
            ConvSpec("conv_2", 3, 256, ("conv_1",), "conv_2", 32),
        ]
        block_in = ("conv_2",)
        widths = ((256, 256, 64), (512, 512, 64), (512, 512, 64))
        i = 3
        for bw, hw in zip(widths, (16, 8, 4)):
            names = []
            for k, c in zip((1, 3, 5), bw):
                specs.append(ConvSpec(f"conv_{i}", k, c, block_in, f"conv_{i}", hw))
                names.append(f"conv_{i}")
                i += 1
            block_in = tuple(names)
        return tuple(specs)

    def _build_head(self, rngs):
        self.fc_12 = Dense(self.fc_in, self.num_classes, rngs=rngs)

    def _body(self, x, masks, train, rec=None):
        L = lambda n, h: self._layer(n, h, masks, train, rec)  # noqa: E731
        x = L("conv_2", L("conv_1", L("conv_0", x)))
        x = max_pool_2x2(x)
        for b, first in enumerate((3, 6, 9)):
            x = jnp.concatenate([L(f"conv_{first + j}", x) for j in range(3)], axis=-1)
            if b < 2:
                x = max_pool_2x2(x)
        return x.mean(axis=(1, 2))

    def _head(self, h, train, key):
        if train:
            h = dropout(h, 0.4, key)
        return self.fc_12(h)


class _WeakCNN(MaskedCNN):
    """CNNSplitter's weak models for patching (``src/experiments/patch/patch_for_weak_model``):
    plain convs with bias and ReLU, no BatchNorm, as the reference; the flattened last map
    (``fc_positions`` positions, NHWC order) -> one FC layer (``fc_layers[0]``), dropout
    ``head_dropout`` before it in training (0: none)."""

    batch_norm = False
    head_dropout = 0.0

    def _build_head(self, rngs):
        setattr(self, self.fc_layers[0], Dense(self.fc_in, self.num_classes, rngs=rngs))

    def _head(self, h, train, key):
        if train and self.head_dropout:
            h = dropout(h, self.head_dropout, key)
        return getattr(self, self.fc_layers[0])(h)


class SimCNNWeak(_WeakCNN):
    """CNNSplitter's weak SimCNN (``simcnn_weak.py``): 4 conv (3x3, 64, SAME), each followed by
    ReLU and a 2x2 pool, flatten (2x2x64 = 256) -> FC N. No BatchNorm, no dropout."""

    arch = "simcnn_weak"
    conv_init = "vgg"
    fc_positions = 4
    fc_input_layers = ("conv_3",)
    fc_layers = ("fc_4",)

    @classmethod
    def _base_topology(cls):
        return tuple(
            ConvSpec(f"conv_{i}", 3, 64, (f"conv_{i - 1}",) if i else (), f"conv_{i}", hw)
            for i, hw in enumerate((32, 16, 8, 4))
        )

    def _body(self, x, masks, train, rec=None):
        for s in self.topology:  # a chain: conv -> ReLU -> pool
            x = max_pool_2x2(self._layer(s.name, x, masks, train, rec))
        return x.reshape(x.shape[0], -1)


class SimCNNSVHNWeak(SimCNNWeak):
    """CNNSplitter's weak SimCNN for SVHN (``simcnn_svhn_weak.py``): 2 conv (5x5, 8, no
    padding), each followed by ReLU and a 2x2 pool (32 -> 28 -> 14 -> 10 -> 5), flatten
    (5x5x8 = 200) -> FC N. No BatchNorm, no dropout."""

    arch = "simcnn_svhn_weak"
    fc_positions = 25
    fc_input_layers = ("conv_1",)
    fc_layers = ("fc_2",)

    @classmethod
    def _base_topology(cls):
        return (ConvSpec("conv_0", 5, 8, (), "conv_0", 32, padding="valid"),
                ConvSpec("conv_1", 5, 8, ("conv_0",), "conv_1", 14, padding="valid"))


class ResCNNWeak(_WeakCNN):
    """CNNSplitter's weak ResCNN (``rescnn_weak.py``): conv_0 (pool), conv_1, conv_2 + shortcut
    from conv_0, conv_3 (pool); 64 channels, 3x3; flatten (8x8x64 = 4096) -> dropout 0.4 ->
    FC N. conv_2 shares conv_0's mask (its output is the shortcut). No BatchNorm."""

    arch = "rescnn_weak"
    fc_positions = 64
    fc_input_layers = ("conv_3",)
    fc_layers = ("fc_4",)
    head_dropout = 0.4

    @classmethod
    def _base_topology(cls):
        return (
            ConvSpec("conv_0", 3, 64, (), "conv_0", 32),
            ConvSpec("conv_1", 3, 64, ("conv_0",), "conv_1", 16),
            ConvSpec("conv_2", 3, 64, ("conv_1",), "conv_0", 16),
            ConvSpec("conv_3", 3, 64, ("conv_2",), "conv_3", 16),
        )

    def _body(self, x, masks, train, rec=None):
        L = lambda n, h: self._layer(n, h, masks, train, rec)  # noqa: E731
        r = max_pool_2x2(L("conv_0", x))
        x = L("conv_2", L("conv_1", r)) + r
        x = max_pool_2x2(L("conv_3", x))
        return x.reshape(x.shape[0], -1)


class ResCNNSVHNWeak(_WeakCNN):
    """CNNSplitter's weak ResCNN for SVHN (``rescnn_svhn_weak.py``): conv_0 (pool), conv_1,
    conv_2 + shortcut from conv_0, then a 2x2 pool; 8 channels, 5x5 SAME; flatten
    (8x8x8 = 512) -> FC N; no dropout, no BatchNorm. The reference also defines a ``conv_3``
    that its ``forward`` never calls; it is left out here (interop drops its weights)."""

    arch = "rescnn_svhn_weak"
    fc_positions = 64
    fc_input_layers = ("conv_2",)
    fc_layers = ("fc_4",)

    @classmethod
    def _base_topology(cls):
        return (
            ConvSpec("conv_0", 5, 8, (), "conv_0", 32),
            ConvSpec("conv_1", 5, 8, ("conv_0",), "conv_1", 16),
            ConvSpec("conv_2", 5, 8, ("conv_1",), "conv_0", 16),
        )

    def _body(self, x, masks, train, rec=None):
        L = lambda n, h: self._layer(n, h, masks, train, rec)  # noqa: E731
        r = max_pool_2x2(L("conv_0", x))
        x = max_pool_2x2(L("conv_2", L("conv_1", r)) + r)
        return x.reshape(x.shape[0], -1)


CNNS: dict[str, type[MaskedCNN]] = {
    c.arch: c for c in (SimCNN, ResCNN, InceCNN, SimCNNCNNSplitter, ResCNNCNNSplitter, SimCNNWeak, ResCNNWeak,
                        SimCNNSVHNWeak, ResCNNSVHNWeak)
}
