"""MwT's ResNet-18 (Qi et al., ICSE 2024; the reference's ``resnet_masked.py``, torchvision's
ResNet-18 with a CIFAR stem): conv 3x3 / 64 (stride 1, no max pool) + BN + ReLU, four stages
of two BasicBlocks (64, 128, 256, 512 channels; stages 2-4 start with stride 2, a 3x3 conv
padded as PyTorch pads, and a 1x1 stride-2 conv + BN shortcut), global average pool,
``Linear(512, N)``.

A block computes ``relu(bn2(conv2(relu(bn1(conv1(x))) * m1)) * m2 + shortcut(x))``: MwT masks
every conv's BN output before the residual sum. Kernel masks: each block's conv1 has its own
mask point; the convs that write a stage's residual stream (the stem or the stage's 1x1
shortcut, and every block's conv2) share one, so a module keeps the same channels of the whole
stream (the union of their MwT masks; the stem has no generator, so stage 1's stream is whole).

Init as the reference: convs kaiming-normal (fan-out, ReLU), BN 1 / 0, the Linear PyTorch's
default. The reference's convs have no bias; ours have one, zero at init, which BatchNorm
cancels in training (its gradient is zero up to rounding), so it stays at zero and the
function is the same.
"""

from __future__ import annotations

import jax

from .base import ConvSpec, Dense, MaskedCNN

__all__ = ["ResNet18"]


class ResNet18(MaskedCNN):
    """ResNet-18 for 32x32 inputs (MwT's)."""

    arch = "resnet18"
    conv_init = "vgg"  # N(0, sqrt(2 / (k * k * C_out))): kaiming-normal, fan-out
    _stages = (64, 128, 256, 512)
    fc_input_layers = ("s3b1_conv2",)
    fc_layers = ("fc",)
    record_in_layer = False

    @classmethod
    def _base_topology(cls):
        specs = [ConvSpec("conv_0", 3, 64, (), "conv_0", 32)]
        prev, stream, hw = "conv_0", "conv_0", 32
        for s, ch in enumerate(cls._stages):
            for b in range(2):
                p, stride = f"s{s}b{b}", 2 if s and not b else 1
                if stride == 2:  # the stage's shortcut conv writes its stream first
                    stream = f"{p}_down"
                    specs.append(ConvSpec(stream, 1, ch, (prev,), stream, hw, 2, "torch"))
                specs.append(ConvSpec(f"{p}_conv1", 3, ch, (prev,), f"{p}_conv1", hw, stride, "torch"))
                hw //= stride
                specs.append(ConvSpec(f"{p}_conv2", 3, ch, (f"{p}_conv1",), stream, hw))
                prev = f"{p}_conv2"
        return tuple(specs)

    def _build_head(self, rngs):
        self.fc = Dense(self.fc_in, self.num_classes, rngs=rngs)

    def _body(self, x, masks, train, rec=None):
        R = (lambda p, v: None) if rec is None else rec.__setitem__  # noqa: E731
        x = self._layer("conv_0", x, masks, train, rec)
        R("conv_0", x)
        for s in range(len(self._stages)):
            for b in range(2):
                p = f"s{s}b{b}"
                short = self._layer(f"{p}_down", x, masks, train, rec, relu=False) if s and not b else x
                h = self._layer(f"{p}_conv1", x, masks, train, rec)
                R(f"{p}_conv1", h)
                x = jax.nn.relu(self._layer(f"{p}_conv2", h, masks, train, rec, relu=False) + short)
                R(self.spec(f"{p}_conv2").mask, x)  # the stream's map: the block's output
        return x.mean(axis=(1, 2))

    def _head(self, h, train, key):
        del train, key
        return self.fc(h)
