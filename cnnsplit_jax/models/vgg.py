"""MwT's VGG16-BN (Qi et al., ICSE 2024; the reference's ``vgg_masked.py``, after
chenyaofo/pytorch-cifar-models): VGG-16's 13 conv (3x3, bias) + BatchNorm in 5 pooled stages,
as SimCNN, and the classifier ``Linear(512, 512) -> ReLU -> Dropout -> Linear(512, 512) -> ReLU
-> Dropout -> Linear(512, N)`` (dropout 0.5 after each hidden layer, not before it as SimCNN).

Init as the reference: conv kaiming-normal (fan-out, ReLU), bias 0; BatchNorm 1 / 0; Linear
N(0, 0.01), bias 0. MwT gives every conv but the first a mask generator (``gate_layers``).
"""

from __future__ import annotations

from .base import Dense, dense_chain, scaled
from .cnn import SimCNN

__all__ = ["VGG16BN"]


class VGG16BN(SimCNN):
    """VGG16-BN for 32x32 inputs; ``fc_hidden`` defaults to ``scaled(512, width)``."""

    arch = "vgg16_bn"

    def __init__(self, num_classes=10, in_channels=3, width=1.0, *, fc_hidden=None, channels=None, rngs):
        super().__init__(num_classes, in_channels, width, fc_hidden=fc_hidden or scaled(512, width),
                         channels=channels, rngs=rngs)

    def _build_head(self, rngs):
        self.fc_13 = Dense(self.fc_in, self.fc_hidden, rngs=rngs, std=0.01)
        self.fc_14 = Dense(self.fc_hidden, self.fc_hidden, rngs=rngs, std=0.01)
        self.fc_15 = Dense(self.fc_hidden, self.num_classes, rngs=rngs, std=0.01)

    def _head(self, h, train, key):  # dropout after each hidden layer, as the reference's classifier
        return dense_chain(h, (self.fc_13, self.fc_14, self.fc_15), train=train, key=key, rate=0.5,
                           dropout_before=(1, 2))
