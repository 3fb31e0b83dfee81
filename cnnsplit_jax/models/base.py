"""Building blocks of every model: the static topology (``ConvSpec``, ``MaskPoint``), the
layers (``ConvBN``, ``Dense``) and the base class ``MaskedCNN``.

A model is described by a static *topology*: a tuple of ``ConvSpec`` (one per conv layer: its
kernel size, output channels, which conv outputs feed it, which mask point gates it) and the
names of the convs feeding the first FC layer. The forward pass takes an optional ``masks``
pytree ``{mask_point_name: float [C]}`` and multiplies each conv's post-ReLU output by its mask
(before pooling). Splitters, extraction and evaluation work from this description only (see
``cnnsplit_jax.models.masks``), so a new architecture needs no new splitter code.

Layout is NHWC / HWIO. Inputs are ``[B, 32, 32, in_channels]`` float arrays, already
normalised. ``__call__`` returns logits ``[B, num_classes]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .conv import conv2d
from .protocol import DECLARED_GRAPH, KERNEL_MASKS

__all__ = ["ConvSpec", "MaskPoint", "ConvBN", "Dense", "MaskedCNN", "SampleGates", "scaled", "dropout",
           "IMAGE_SIZE", "BN_EPS", "BN_MOMENTUM"]

IMAGE_SIZE = 32
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * running + m * batch
PADDINGS = ("same", "torch", "valid")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv layer: ``relu(bn(conv(concat(inputs)))) * masks[mask]``.

    Attributes:
      name: layer name, e.g. ``"conv_3"`` (also the attribute holding its ``ConvBN``).
      ksize: kernel size (odd for SAME padding).
      out_channels: kernels of this layer.
      inputs: names of the conv layers whose (masked) outputs are concatenated, in order, to
        form this layer's input; ``()`` means the image.
      mask: name of the mask point gating this layer's output channels.
      spatial: the layer's input height (= width) for 32x32 images (used for FLOP counts).
      stride: spatial stride (SAME padding; the output is ``spatial / stride`` high).
      padding: ``"same"`` (the default), ``"torch"`` (PyTorch's ``ksize // 2`` on every side;
        differs from SAME at stride 2: MwT's ResNet-18) or ``"valid"`` (no padding: the output
        is ``spatial - ksize + 1`` high; stride 1 only; CNNSplitter's SVHN weak SimCNN).
    """

    name: str
    ksize: int
    out_channels: int
    inputs: tuple[str, ...]
    mask: str
    spatial: int = 32
    stride: int = 1
    padding: str = "same"

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"{self.name}: padding {self.padding!r}; expected one of {PADDINGS}")
        if self.padding == "valid" and self.stride != 1:
            raise ValueError(f"{self.name}: valid padding supports stride 1 only")

    @property
    def out_spatial(self) -> int:
        """Output height (= width) for the 32x32 input convention of ``spatial``."""
        if self.padding == "valid":
            return self.spatial - self.ksize + 1
        return -(-self.spatial // self.stride)


@dataclasses.dataclass(frozen=True)
class MaskPoint:
    """A per-kernel mask vector: ``size`` entries gating the convs in ``layers``.

    ``len(layers) > 1`` for ResCNN's tied shortcut pairs: one mask gates both layers, and the
    kernel count of the mask point is ``size * len(layers)``.
    """

    name: str
    size: int
    layers: tuple[str, ...]


class SampleGates:
    """Per-sample kernel masks computed inside the forward pass from each gated layer's input
    (MwT's mask generators), passed as a model's ``masks``.

    ``gate(layer, x_in) -> [B, C]`` maps a conv layer's input x_in [B, H, W, C_in] to the
    layer's per-sample masks (>= 0), which multiply its post-ReLU output channel-wise (=
    multiplying the BatchNorm output before the ReLU, since the masks are non-negative).
    ``layers``: the conv layers that are gated, by layer name (a tied mask point's layers are
    gated one by one, each from its own input); the others run unmasked. Every mask computed
    in a forward pass is stored in ``masks`` (layer -> [B, C], in forward order), for the losses.
    """

    def __init__(self, gate: Callable[[str, jax.Array], jax.Array], layers: Iterable[str]):
        self.gate, self.layers, self.masks = gate, tuple(layers), {}

    def __call__(self, layer: str, x_in: jax.Array) -> jax.Array:
        m = self.gate(layer, x_in)
        self.masks[layer] = m
        return m


def scaled(channels: int, width: float) -> int:
    """Channels of a layer at ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


def torch_uniform(key, shape, fan_in):
    """PyTorch's default init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def dropout(x, rate: float, key):
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def dense_chain(h, layers, *, train: bool, key, rate: float, dropout_before: tuple[int, ...] = ()):
    """``h`` [B, F] through the dense ``layers`` in order, ReLU after each but the last; in
    training, dropout ``rate`` on the input of each layer whose index is in ``dropout_before``
    (their keys: ``jax.random.split(key, len(dropout_before))`` in that order)."""
    keys = dict(zip(dropout_before, jax.random.split(key, len(dropout_before)))) if train and dropout_before else {}
    for i, fc in enumerate(layers):
        if i in keys:
            h = dropout(h, rate, keys[i])
        h = fc(h)
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


class ConvBN(nnx.Module):
    """Conv (with bias) followed by BatchNorm with PyTorch semantics (``bn=False``: no BN).

    Training mode normalises with the biased batch variance and updates ``running_var`` with
    the unbiased one (as ``torch.nn.BatchNorm2d``), momentum 0.1, eps 1e-5.
    """

    def __init__(self, cin: int, cout: int, ksize: int, *, init: str, rngs: nnx.Rngs,
                 stride: int = 1, bn: bool = True, padding: str = "same"):
        kk, kb = rngs.params(), rngs.params()
        fan_in = cin * ksize * ksize
        self.stride = int(stride)
        self.padding = padding
        self.bn = bool(bn)
        if init == "vgg":  # SimCNN: N(0, sqrt(2 / (k*k*Cout))), bias 0
            w = jax.random.normal(kk, (ksize, ksize, cin, cout)) * math.sqrt(
                2.0 / (ksize * ksize * cout))
            b = jnp.zeros((cout,))
        elif init == "he":  # Keras he_normal (Pan & Rajan's ResNets): N(0, sqrt(2 / fan_in))
            w = jax.random.normal(kk, (ksize, ksize, cin, cout)) * math.sqrt(2.0 / fan_in)
            b = jnp.zeros((cout,))
        else:  # PyTorch default: U(+-1/sqrt(fan_in)) for weight and bias
            w = torch_uniform(kk, (ksize, ksize, cin, cout), fan_in)
            b = torch_uniform(kb, (cout,), fan_in)
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
            return conv2d(x, self.kernel[...], self.bias[...], stride=self.stride, padding=self.padding)
        if not train:
            # Inference: fold BN into the conv on every call (kernel * inv, one bias). Measured
            # on XLA:CPU: SimCNN forward ~15% faster than conv -> scale/shift, and also faster
            # than passing pre-folded kernels (the fused multiply writes the kernel in the
            # layout the convolution wants).
            inv = jax.lax.rsqrt(self.var[...] + BN_EPS) * self.scale[...]
            bias = (self.bias[...] - self.mean[...]) * inv + self.offset[...]
            return conv2d(x, self.kernel[...] * inv, bias, stride=self.stride, padding=self.padding)
        y = conv2d(x, self.kernel[...], self.bias[...], stride=self.stride, padding=self.padding)
        mean = y.mean(axis=(0, 1, 2))
        var = jnp.square(y - mean).mean(axis=(0, 1, 2))
        n = y.shape[0] * y.shape[1] * y.shape[2]
        unbiased = var * (n / max(n - 1, 1))
        self.mean[...] = (1 - BN_MOMENTUM) * self.mean[...] + BN_MOMENTUM * mean
        self.var[...] = (1 - BN_MOMENTUM) * self.var[...] + BN_MOMENTUM * unbiased
        inv = jax.lax.rsqrt(var + BN_EPS) * self.scale[...]
        return y * inv + (self.offset[...] - mean * inv)


class Dense(nnx.Module):
    """Linear layer ``x @ kernel + bias``; kernel is [in, out]. Init: PyTorch's default
    (U(+-1/sqrt(fin)) for both), or with ``std``: kernel N(0, std), bias 0 (torchvision's VGG)."""

    def __init__(self, fin: int, fout: int, *, rngs: nnx.Rngs, std: float | None = None):
        kk, kb = rngs.params(), rngs.params()
        if std is None:
            self.kernel = nnx.Param(torch_uniform(kk, (fin, fout), fin))
            self.bias = nnx.Param(torch_uniform(kb, (fout,), fin))
        else:
            self.kernel = nnx.Param(jax.random.normal(kk, (fin, fout)) * std)
            self.bias = nnx.Param(jnp.zeros((fout,)))

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...]


class MaskedCNN(nnx.Module):
    """Base class: builds the conv stack from ``topology`` and applies masks.

    Subclasses define ``arch``, ``_base_topology()`` (width-1 channels), ``fc_input_layers``,
    ``fc_layers``, ``_build_head``, ``_body`` and ``_head``.

    Class attributes:
      mask_kind: what a module of this model masks: ``"kernel"`` (per-kernel masks: GradSplitter,
        CNNSplitter) or ``"node"`` (per-position maps of ReLU inputs: concern identification).
    """

    arch: str = ""
    conv_init: str = "torch"
    batch_norm: bool = True
    mask_kind: str = "kernel"
    #: what this model can do (``models.protocol``)
    capabilities: frozenset = frozenset({KERNEL_MASKS, DECLARED_GRAPH})

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
                s, out_channels=int(channels.pop(s.name, scaled(s.out_channels, width))))
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
                                         rngs=rngs, stride=s.stride, bn=self.batch_norm,
                                         padding=s.padding))
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

    def gate_layers(self) -> tuple[tuple[str, int, int], ...]:
        """``(layer, C_in, C_out)`` of every conv that reads another conv's output (the layers
        per-sample gates may read: MwT's generators; the conv reading the image has none)."""
        return tuple((s.name, sum(self.spec(i).out_channels for i in s.inputs), s.out_channels)
                     for s in self.topology if s.inputs)

    def mask_points(self) -> tuple[MaskPoint, ...]:
        """Mask points in topology order, with their sizes and the layers they gate."""
        order: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for s in self.topology:
            order.setdefault(s.mask, []).append(s.name)
            sizes[s.mask] = s.out_channels
        return tuple(MaskPoint(n, sizes[n], tuple(ls)) for n, ls in order.items())

    def spec(self, name: str) -> ConvSpec:
        """The ``ConvSpec`` of conv layer ``name``."""
        for s in self.topology:
            if s.name == name:
                return s
        raise KeyError(name)

    def definition_spec(self) -> None:
        """None: a zoo model is rebuilt from ``config()`` (``models.protocol``)."""
        return None

    def config(self) -> dict:
        """Constructor arguments that rebuild this model's structure (``build_model``); an
        extracted (pruned) model adds ``channels``, ``{layer: C_out}`` of the layers whose
        output channels differ from the width's."""
        cfg = {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
               "width": self.width}
        pruned = {s.name: s.out_channels for s, d in zip(self.topology, self._base_topology())
                  if s.out_channels != scaled(d.out_channels, self.width)}
        return {**cfg, "channels": pruned} if pruned else cfg

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one input image."""
        return (IMAGE_SIZE, IMAGE_SIZE, self.in_channels)

    # --- checks ------------------------------------------------------------------------
    def check_input(self, x) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, 32, 32, in_channels]``."""
        want = (IMAGE_SIZE, IMAGE_SIZE, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"{self.arch} expects images [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                f"got shape {tuple(x.shape)}")

    def check_named(self, given, shapes: Mapping[str, tuple], key: str, entry: str) -> None:
        """Raise ``ValueError`` unless every entry of ``given`` (``{name: array}``, or None) is a
        name of ``shapes`` with that shape; ``key`` / ``entry`` name the keys and the arrays in
        messages (``"mask point"`` / ``"mask"``)."""
        if given is None:
            return
        unknown = set(given) - set(shapes)
        if unknown:
            raise ValueError(f"unknown {key}(s) {sorted(unknown)} for {self.arch}; expected {list(shapes)}")
        for name, v in given.items():
            if tuple(v.shape) != tuple(shapes[name]):
                raise ValueError(f"{entry} {name!r} of {self.arch} must have shape {tuple(shapes[name])}, "
                                 f"got {tuple(v.shape)}")

    def _check_masks(self, masks):
        if isinstance(masks, SampleGates):
            layers = [spec.name for spec in self.topology]
            unknown = set(masks.layers) - set(layers)
            if unknown:
                raise ValueError(f"unknown gated layer(s) {sorted(unknown)} for {self.arch}; expected conv layers of "
                                 f"{layers}")
            return
        self.check_named(masks, {p.name: (p.size,) for p in self.mask_points()}, "mask point", "mask")

    # --- forward -----------------------------------------------------------------------
    #: ``kernel_maps`` records every conv's (masked) post-ReLU output before pooling; ResCNN
    #: records its block outputs itself (the reference's kernel-importance convention)
    record_in_layer: bool = True

    def _layer(self, name: str, x, masks, train: bool, rec: dict | None = None, relu: bool = True):
        """Conv ``name`` (+ BN), its ReLU (``relu=False``: none, the layer's output is added to a
        shortcut first), its masks."""
        spec = self.spec(name)
        y = getattr(self, name)(x, train=train)
        y = jax.nn.relu(y) if relu else y
        if isinstance(masks, SampleGates):
            if name in masks.layers:  # per-sample masks from this layer's input
                y = y * masks(name, x)[:, None, None, :].astype(y.dtype)
        elif masks is not None and spec.mask in masks:
            y = y * masks[spec.mask].astype(y.dtype)
        if rec is not None and self.record_in_layer:
            rec[spec.mask] = y
        return y

    def kernel_maps(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None) -> dict:
        """Inference-mode feature maps ``{mask_point: [B, H, W, C]}`` whose per-channel sums
        are CNNSplitter's kernel importance (spec cnnsplitter.md 1a.3): the post-ReLU map
        before pooling; for ResCNN the block output (pooled where the block pools), and for a
        tied pair the residual sum."""
        self.check_input(x)
        self._check_masks(masks)
        rec: dict = {}
        self._body(x, masks, False, rec)
        return rec

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
        self.check_input(x)
        self._check_masks(masks)
        if train and dropout_key is None:
            raise ValueError("train=True needs a dropout_key (jax.random key)")
        feats = self._body(x, masks, train)
        return self._head(feats, train and dropout, dropout_key)

    def features(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """Inference-mode input of the first FC layer, [B, fc_in] (conv stack + flatten/GAP)."""
        self.check_input(x)
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

    def _body(self, x, masks, train, rec: dict | None = None):
        """Conv stack -> first FC layer's input [B, fc_in]; records feature maps into
        ``rec`` (a dict passed by ``kernel_maps``) when given."""
        raise NotImplementedError

    def _build_head(self, rngs):
        raise NotImplementedError

    def _head(self, feats, train, key):
        raise NotImplementedError
