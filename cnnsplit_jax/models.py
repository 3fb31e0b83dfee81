"""Flax NNX SimCNN, ResCNN and InceCNN (GradSplitter / CNNSplitter papers) with mask points.

Every model is described by a static *topology*: a tuple of ``ConvSpec`` (one per conv layer:
its kernel size, output channels, which conv outputs feed it, which mask point gates it) and the
names of the convs feeding the first FC layer. The forward pass takes an optional ``masks``
pytree ``{mask_point_name: float [C]}`` and multiplies each conv's post-ReLU output by its
mask (before pooling). Splitters, extraction and evaluation work from this description only
(see ``cnnsplit_jax.masks``), so a new architecture needs no new splitter code.

Layout is NHWC / HWIO. Inputs are ``[B, 32, 32, in_channels]`` float arrays, already
normalised. ``__call__`` returns logits ``[B, num_classes]``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .conv import conv2d, max_pool_2x2

__all__ = [
    "ConvSpec",
    "MaskPoint",
    "ConvBN",
    "Dense",
    "MaskedCNN",
    "SimCNN",
    "ResCNN",
    "InceCNN",
    "SimCNNWeak",
    "ResCNNWeak",
    "ARCHITECTURES",
    "build_model",
    "scaled",
]

IMAGE_SIZE = 32
# feature maps recorded by ``MaskedCNN.kernel_maps`` (set only for the duration of that call)
_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cnnsplit_record", default=None)
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * running + m * batch


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv layer: ``relu(bn(conv(concat(inputs)))) * masks[mask]``.

    Attributes:
      name: layer name, e.g. ``"conv_3"`` (also the attribute holding its ``ConvBN``).
      ksize: odd kernel size (SAME padding).
      out_channels: kernels of this layer.
      inputs: names of the conv layers whose (masked) outputs are concatenated, in order, to
        form this layer's input; ``()`` means the image.
      mask: name of the mask point gating this layer's output channels.
      spatial: the layer's input height (= width) for 32x32 images (used for FLOP counts).
      stride: spatial stride (SAME padding; the output is ``spatial / stride`` high).
    """

    name: str
    ksize: int
    out_channels: int
    inputs: tuple[str, ...]
    mask: str
    spatial: int = 32  # input height = width of this layer for 32x32 images
    stride: int = 1


@dataclasses.dataclass(frozen=True)
class MaskPoint:
    """A per-kernel mask vector: ``size`` entries gating the convs in ``layers``.

    ``len(layers) > 1`` for ResCNN's tied shortcut pairs: one mask gates both layers, and the
    kernel count of the mask point is ``size * len(layers)``.
    """

    name: str
    size: int
    layers: tuple[str, ...]


def scaled(channels: int, width: float) -> int:
    """Channels of a layer at ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


def _torch_uniform(key, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class ConvBN(nnx.Module):
    """Conv (with bias) followed by BatchNorm with PyTorch semantics (``bn=False``: no BN).

    Training mode normalises with the biased batch variance and updates ``running_var`` with
    the unbiased one (as ``torch.nn.BatchNorm2d``), momentum 0.1, eps 1e-5.
    """

    def __init__(self, cin: int, cout: int, ksize: int, *, init: str, rngs: nnx.Rngs,
                 stride: int = 1, bn: bool = True):
        kk, kb = rngs.params(), rngs.params()
        fan_in = cin * ksize * ksize
        self.stride = int(stride)
        self.bn = bool(bn)
        if init == "vgg":  # SimCNN: N(0, sqrt(2 / (k*k*Cout))), bias 0
            w = jax.random.normal(kk, (ksize, ksize, cin, cout)) * math.sqrt(
                2.0 / (ksize * ksize * cout)
            )
            b = jnp.zeros((cout,))
        elif init == "he":  # Keras he_normal (Pan & Rajan's ResNets): N(0, sqrt(2 / fan_in))
            w = jax.random.normal(kk, (ksize, ksize, cin, cout)) * math.sqrt(2.0 / fan_in)
            b = jnp.zeros((cout,))
        else:  # PyTorch default: U(+-1/sqrt(fan_in)) for weight and bias
            w = _torch_uniform(kk, (ksize, ksize, cin, cout), fan_in)
            b = _torch_uniform(kb, (cout,), fan_in)
        self.kernel = nnx.Param(w)
        self.bias = nnx.Param(b)
        if not self.bn:
            return
        self.scale = nnx.Param(jnp.ones((cout,)))
        self.offset = nnx.Param(jnp.zeros((cout,)))
        self.mean = nnx.BatchStat(jnp.zeros((cout,)))
        self.var = nnx.BatchStat(jnp.ones((cout,)))

    def __call__(self, x, *, train: bool = False):
        if not self.bn:
            return conv2d(x, self.kernel[...], self.bias[...], stride=self.stride)
        if not train:
            # Inference: fold BN into the conv on every call (kernel * inv, one bias). Measured
            # on XLA:CPU: SimCNN forward ~15% faster than conv -> scale/shift, and also faster
            # than passing pre-folded kernels (the fused multiply writes the kernel in the
            # layout the convolution wants).
            inv = jax.lax.rsqrt(self.var[...] + BN_EPS) * self.scale[...]
            bias = (self.bias[...] - self.mean[...]) * inv + self.offset[...]
            return conv2d(x, self.kernel[...] * inv, bias, stride=self.stride)
        y = conv2d(x, self.kernel[...], self.bias[...], stride=self.stride)
        mean = y.mean(axis=(0, 1, 2))
        var = jnp.square(y - mean).mean(axis=(0, 1, 2))
        n = y.shape[0] * y.shape[1] * y.shape[2]
        unbiased = var * (n / max(n - 1, 1))
        self.mean[...] = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * mean
        self.var[...] = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * unbiased
        inv = jax.lax.rsqrt(var + BN_EPS) * self.scale[...]
        return y * inv + (self.offset[...] - mean * inv)


class Dense(nnx.Module):
    """Linear layer ``x @ kernel + bias`` with PyTorch's default init; kernel is [in, out]."""

    def __init__(self, fin: int, fout: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_torch_uniform(rngs.params(), (fin, fout), fin))
        self.bias = nnx.Param(_torch_uniform(rngs.params(), (fout,), fin))

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...]


def _dropout(x, rate: float, key):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class MaskedCNN(nnx.Module):
    """Base class: builds the conv stack from ``topology`` and applies masks.

    Subclasses define ``arch``, ``_base_topology()`` (width-1 channels), ``fc_inputs`` and
    ``_head`` / ``_body``.
    """

    arch: str = ""
    conv_init: str = "torch"
    batch_norm: bool = True

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        *,
        channels: Mapping[str, int] | None = None,
        rngs: nnx.Rngs,
    ):
        """``channels`` overrides the output channels of named conv layers (pruned modules)."""
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = float(width)
        channels = dict(channels or {})
        self.topology = tuple(
            dataclasses.replace(
                s, out_channels=int(channels.pop(s.name, scaled(s.out_channels, width)))
            )
            for s in self._base_topology()
        )
        if channels:
            raise ValueError(f"channels for unknown layers {sorted(channels)} of {self.arch}")
        for p in self.mask_points():  # layers sharing a mask must keep equal channels
            sizes = {s.out_channels for s in self.topology if s.mask == p.name}
            if len(sizes) != 1:
                raise ValueError(f"layers {p.layers} share mask {p.name!r} but have channels {sizes}")
        out = {s.name: s.out_channels for s in self.topology}
        for s in self.topology:
            cin = sum(out[i] for i in s.inputs) if s.inputs else in_channels
            setattr(self, s.name, ConvBN(cin, s.out_channels, s.ksize, init=self.conv_init,
                                         rngs=rngs, stride=s.stride, bn=self.batch_norm))
        self.fc_in = sum(out[n] for n in self.fc_input_layers) * self.fc_positions
        self._build_head(rngs)

    # --- description -------------------------------------------------------------------
    @classmethod
    def _base_topology(cls) -> tuple[ConvSpec, ...]:
        raise NotImplementedError

    fc_input_layers: tuple[str, ...] = ()
    #: FC layers in order (the first reads the conv features); copied by extraction
    fc_layers: tuple[str, ...] = ()
    #: spatial positions flattened into the first FC layer's input (NHWC order: position-major)
    fc_positions: int = 1

    def mask_points(self) -> tuple[MaskPoint, ...]:
        """Mask points in topology order, with their sizes and the layers they gate."""
        order: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for s in self.topology:
            order.setdefault(s.mask, []).append(s.name)
            sizes[s.mask] = s.out_channels
        return tuple(MaskPoint(n, sizes[n], tuple(ls)) for n, ls in order.items())

    # --- forward -----------------------------------------------------------------------
    def _check_input(self, x):
        want = (IMAGE_SIZE, IMAGE_SIZE, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"{self.arch} expects images [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                f"got shape {tuple(x.shape)}"
            )

    def _check_masks(self, masks):
        if masks is None:
            return
        points = {p.name: p.size for p in self.mask_points()}
        unknown = set(masks) - set(points)
        if unknown:
            raise ValueError(
                f"unknown mask point(s) {sorted(unknown)} for {self.arch}; "
                f"expected {list(points)}"
            )
        for name, m in masks.items():
            if tuple(m.shape) != (points[name],):
                raise ValueError(
                    f"mask {name!r} of {self.arch} must have shape ({points[name]},), "
                    f"got {tuple(m.shape)}"
                )

    def _layer(self, name: str, x, masks, train: bool):
        spec = self._spec(name)
        y = jax.nn.relu(getattr(self, name)(x, train=train))
        if masks is not None and spec.mask in masks:
            y = y * masks[spec.mask].astype(y.dtype)
        if self.record_in_layer:
            self._record(spec.mask, y)
        return y

    #: ``kernel_maps`` records every conv's (masked) post-ReLU output before pooling; ResCNN
    #: records its block outputs itself (the reference's kernel-importance convention)
    record_in_layer: bool = True

    @staticmethod
    def _record(point: str, y) -> None:
        rec = _RECORD.get()
        if rec is not None:
            rec[point] = y

    def kernel_maps(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None) -> dict:
        """Inference-mode feature maps ``{mask_point: [B, H, W, C]}`` whose per-channel sums
        are CNNSplitter's kernel importance (spec cnnsplitter.md 1a.3): the post-ReLU map
        before pooling; for ResCNN the block output (pooled where the block pools), and for a
        tied pair the residual sum."""
        self._check_input(x)
        self._check_masks(masks)
        rec: dict = {}
        token = _RECORD.set(rec)
        try:
            self._body(x, masks, False)
        finally:
            _RECORD.reset(token)
        return rec

    def _spec(self, name: str) -> ConvSpec:
        for s in self.topology:
            if s.name == name:
                return s
        raise KeyError(name)

    def __call__(
        self,
        x: jax.Array,
        masks: Mapping[str, jax.Array] | None = None,
        *,
        train: bool = False,
        dropout_key: jax.Array | None = None,
        dropout: bool = True,
    ) -> jax.Array:
        """Logits [B, num_classes] for images x [B, 32, 32, in_channels].

        Args:
          masks: optional ``{mask_point: [C]}``; missing points are treated as all ones.
          train: batch statistics for BN (and updates running stats) and dropout.
          dropout_key: PRNG key for dropout; required when ``train`` is True.
          dropout: apply dropout in training mode (False: BN still in training mode).
        """
        self._check_input(x)
        self._check_masks(masks)
        if train and dropout_key is None:
            raise ValueError("train=True needs a dropout_key (jax.random key)")
        feats = self._body(x, masks, train)
        return self._head(feats, train and dropout, dropout_key)

    def features(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """Inference-mode input of the first FC layer, [B, fc_in] (conv stack + flatten/GAP)."""
        self._check_input(x)
        self._check_masks(masks)
        return self._body(x, masks, False)

    def fc_chain(self, h: jax.Array, start: int = 0, stop: int | None = None) -> jax.Array:
        """Inference-mode FC layers ``fc_layers[start:stop]`` (ReLU after each but the last
        of the model), so ``model(x) == model.fc_chain(model.features(x))`` in eval mode."""
        stop = len(self.fc_layers) if stop is None else stop
        for j in range(start, stop):
            h = getattr(self, self.fc_layers[j])(h)
            if j < len(self.fc_layers) - 1:
                h = jax.nn.relu(h)
        return h

    def _body(self, x, masks, train):
        raise NotImplementedError

    def _build_head(self, rngs):
        raise NotImplementedError

    def _head(self, feats, train, key):
        raise NotImplementedError


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

    def _body(self, x, masks, train):
        for i in range(13):
            x = self._layer(f"conv_{i}", x, masks, train)
            if i in self._pool_after:
                x = max_pool_2x2(x)
        return x.reshape(x.shape[0], -1)

    def _head(self, h, train, key):
        if train:
            k1, k2 = jax.random.split(key)
            h = _dropout(h, 0.5, k1)
        h = jax.nn.relu(self.fc_13(h))
        if train:
            h = _dropout(h, 0.5, k2)
        h = jax.nn.relu(self.fc_14(h))
        return self.fc_15(h)


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

    def _body(self, x, masks, train):
        L = lambda n, h: self._layer(n, h, masks, train)  # noqa: E731
        R = self._record
        x = L("conv_0", x)
        R("conv_0", x)
        x = max_pool_2x2(L("conv_1", x))
        r = x
        h = L("conv_2", x)
        R("conv_2", h)
        x = L("conv_3", h) + r
        R("conv_1", x)  # the tied pair (conv_1, conv_3): the residual sum
        x = max_pool_2x2(L("conv_4", x))
        R("conv_4", x)
        x = max_pool_2x2(L("conv_5", x))
        r = x
        h = L("conv_6", x)
        R("conv_6", h)
        x = L("conv_7", h) + r
        R("conv_5", x)
        x = max_pool_2x2(L("conv_8", x))
        R("conv_8", x)
        x = max_pool_2x2(L("conv_9", x))
        r = x
        h = L("conv_10", x)
        R("conv_10", h)
        x = L("conv_11", h) + r
        R("conv_9", x)
        return x.reshape(x.shape[0], -1)

    def _head(self, h, train, key):
        if train:
            h = _dropout(h, 0.5, key)
        return self.fc_12(h)


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

    def _body(self, x, masks, train):
        L = lambda n, h: self._layer(n, h, masks, train)  # noqa: E731
        x = L("conv_2", L("conv_1", L("conv_0", x)))
        x = max_pool_2x2(x)
        for b, first in enumerate((3, 6, 9)):
            x = jnp.concatenate([L(f"conv_{first + j}", x) for j in range(3)], axis=-1)
            if b < 2:
                x = max_pool_2x2(x)
        return x.mean(axis=(1, 2))

    def _head(self, h, train, key):
        if train:
            h = _dropout(h, 0.4, key)
        return self.fc_12(h)


class SimCNNWeak(MaskedCNN):
    """CNNSplitter's weak model for patching: 4 conv (3x3, 64) each followed by a 2x2 pool,
    flatten (2x2x64 = 256) -> FC N. No dropout. (BN as in our other models.)"""

    arch = "simcnn_weak"
    conv_init = "vgg"
    fc_input_layers = ("conv_3",)
    fc_layers = ("fc_4",)
    fc_positions = 4

    @classmethod
    def _base_topology(cls):
        return tuple(
            ConvSpec(f"conv_{i}", 3, 64, (f"conv_{i - 1}",) if i else (), f"conv_{i}", hw)
            for i, hw in enumerate((32, 16, 8, 4))
        )

    def _build_head(self, rngs):
        self.fc_4 = Dense(self.fc_in, self.num_classes, rngs=rngs)

    def _body(self, x, masks, train):
        for i in range(4):
            x = max_pool_2x2(self._layer(f"conv_{i}", x, masks, train))
        return x.reshape(x.shape[0], -1)

    def _head(self, h, train, key):
        return self.fc_4(h)


class ResCNNWeak(MaskedCNN):
    """CNNSplitter's weak ResCNN for patching: conv_0 (pool), conv_1, conv_2 + shortcut from
    conv_0, conv_3 (pool); 64 channels; flatten (8x8x64 = 4096) -> dropout 0.4 -> FC N.
    conv_2 shares conv_0's mask (its output is the shortcut)."""

    arch = "rescnn_weak"
    fc_input_layers = ("conv_3",)
    fc_layers = ("fc_4",)
    fc_positions = 64

    @classmethod
    def _base_topology(cls):
        return (
            ConvSpec("conv_0", 3, 64, (), "conv_0", 32),
            ConvSpec("conv_1", 3, 64, ("conv_0",), "conv_1", 16),
            ConvSpec("conv_2", 3, 64, ("conv_1",), "conv_0", 16),
            ConvSpec("conv_3", 3, 64, ("conv_2",), "conv_3", 16),
        )

    def _build_head(self, rngs):
        self.fc_4 = Dense(self.fc_in, self.num_classes, rngs=rngs)

    def _body(self, x, masks, train):
        L = lambda n, h: self._layer(n, h, masks, train)  # noqa: E731
        r = max_pool_2x2(L("conv_0", x))
        x = L("conv_2", L("conv_1", r)) + r
        x = max_pool_2x2(L("conv_3", x))
        return x.reshape(x.shape[0], -1)

    def _head(self, h, train, key):
        if train:
            h = _dropout(h, 0.4, key)
        return self.fc_4(h)


ARCHITECTURES: dict[str, type[MaskedCNN]] = {
    "simcnn": SimCNN,
    "rescnn": ResCNN,
    "incecnn": InceCNN,
    "simcnn_weak": SimCNNWeak,
    "rescnn_weak": ResCNNWeak,
}

from .resnet import RESNETS  # noqa: E402  (resnet.py builds on the classes above)

ARCHITECTURES.update(RESNETS)


def build_model(
    arch: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    key: jax.Array | int = 0,
    **kwargs,
) -> MaskedCNN:
    """Build an architecture by name (``simcnn``, ``rescnn``, ``incecnn``).

    ``key``: a ``jax.random`` key or an int seed for parameter init.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    rngs = nnx.Rngs(params=key)
    return ARCHITECTURES[arch](num_classes, in_channels, width, rngs=rngs, **kwargs)
