"""PyTorch interop (optional ``torch`` extra): the reference implementations' state-dict layouts.

``load_torch_state_dict`` turns a state dict of the authors' models into one of ours (OIHW ->
HWIO, Linear (out, in) -> (in, out)); architecture sizes (classes, input channels, width,
SimCNN's FC width) are read off the tensor shapes. Layouts (``LAYOUTS``):

* GradSplitter's ``simcnn`` / ``rescnn`` / ``incecnn``: ``conv_{i}.0.weight|bias`` (the conv),
  ``conv_{i}.1.weight|bias|running_mean|running_var`` (its BatchNorm), ``fc_{j}.weight|bias``;
* CNNSplitter's ``simcnn_cnnsplitter``: ``conv_{i}.weight|bias`` (no BatchNorm), ``fc_13`` /
  ``fc_14`` / ``fc_15``; ``rescnn_cnnsplitter``: ``conv_{i}.0.weight|bias`` (conv, ReLU and pool
  in one block, no BatchNorm), ``classifier.2.weight|bias`` (Flatten, Dropout, Linear);
* CNNSplitter's weak patching models: ``simcnn_weak`` ``conv_{i}`` + ``fc_4``, ``simcnn_svhn_weak``
  ``conv_{i}`` + ``fc_2``, ``rescnn_weak`` ``conv_{i}.0`` + ``classifier.2``, ``rescnn_svhn_weak``
  ``conv_{i}.0`` + ``classifier.1`` (no BatchNorm). Their FC reads a flattened map of several
  positions: PyTorch flattens NCHW (channel-major), ours NHWC (position-major), so the first FC's
  input rows are permuted on the way in and out. ``rescnn_svhn_weak``'s reference defines a
  ``conv_3`` its forward never calls: its weights are dropped on loading, and written as zeros
  (so the reference's strict ``load_state_dict`` accepts the file).

A path is read with ``torch.load(path, map_location="cpu", weights_only=True)``; a mapping of
NumPy arrays needs no torch at all.

``torch_model`` builds a PyTorch model of the same architecture and layout (used by the
interop tests and as the baseline in ``benchmarks/``). Its ``forward(x, masks=None)`` takes
NCHW input and optional per-layer masks applied after the ReLU like ours.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from . import ARCHITECTURES, build_model
from .base import MaskedCNN

__all__ = ["load_torch_state_dict", "to_torch_state_dict", "torch_model"]

_SIM_FC = {"fc_13": "fc_13", "fc_14": "fc_14", "fc_15": "fc_15"}

#: per architecture: (the conv's key prefix, its BatchNorm's prefix or None, {our FC: theirs})
LAYOUTS = {
    "simcnn": ("{}.0", "{}.1", _SIM_FC),
    "rescnn": ("{}.0", "{}.1", {"fc_12": "fc_12"}),
    "incecnn": ("{}.0", "{}.1", {"fc_12": "fc_12"}),
    "simcnn_cnnsplitter": ("{}", None, _SIM_FC),
    "rescnn_cnnsplitter": ("{}.0", None, {"fc_12": "classifier.2"}),
    "simcnn_weak": ("{}", None, {"fc_4": "fc_4"}),
    "simcnn_svhn_weak": ("{}", None, {"fc_2": "fc_2"}),
    "rescnn_weak": ("{}.0", None, {"fc_4": "classifier.2"}),
    "rescnn_svhn_weak": ("{}.0", None, {"fc_4": "classifier.1"}),
}

#: reference convs that its forward never calls: (arch -> (key prefix, copy the shape of))
_UNCALLED = {"rescnn_svhn_weak": ("conv_3.0", "conv_2")}


def _fc_from_torch(positions: int):
    """Torch Linear (out, C*P) reading an NCHW flatten -> our kernel (P*C, out) reading NHWC."""
    def f(a):
        out, n = a.shape
        return a.reshape(out, n // positions, positions).transpose(2, 1, 0).reshape(n, out)
    return f


def _fc_to_torch(a, positions: int):
    n, out = a.shape
    return a.reshape(positions, n // positions, out).transpose(2, 1, 0).reshape(out, n)


def _check_arch(arch: str) -> None:
    if arch not in LAYOUTS:
        raise ValueError(f"no PyTorch layout for model {arch!r}; interop covers {sorted(LAYOUTS)}")


def _as_numpy(sd) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out


def _read(path_or_sd) -> dict[str, np.ndarray]:
    if isinstance(path_or_sd, (str, os.PathLike)):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                "reading a .pth file needs PyTorch: pip install torch==2.13.0 (CPU) or "
                "pass a mapping of NumPy arrays"
            ) from e
        sd = torch.load(os.fspath(path_or_sd), map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path_or_sd} does not hold a state dict (got {type(sd).__name__})")
        return _as_numpy(sd)
    return _as_numpy(path_or_sd)


def load_torch_state_dict(arch: str, path_or_state_dict) -> MaskedCNN:
    """Build ``arch`` with the weights of a reference PyTorch state dict (``LAYOUTS``).

    Raises:
      ValueError: unknown architecture, missing or unexpected keys, or shapes that do not
        fit the architecture.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    _check_arch(arch)
    conv, bn, fcs = LAYOUTS[arch]
    sd = {k: v for k, v in _read(path_or_state_dict).items() if not k.endswith("num_batches_tracked")}
    try:
        w0 = sd[conv.format("conv_0") + ".weight"]
        last_fc = sd[list(fcs.values())[-1] + ".weight"]
    except KeyError as e:
        raise ValueError(f"not a reference {arch} state dict: missing key {e}") from None
    base0 = ARCHITECTURES[arch]._base_topology()[0].out_channels
    kwargs = dict(num_classes=int(last_fc.shape[0]), in_channels=int(w0.shape[1]), width=w0.shape[0] / base0)
    if "fc_13" in fcs:
        kwargs["fc_hidden"] = int(sd[fcs["fc_13"] + ".weight"].shape[0])
    model = build_model(arch, **kwargs)
    expected = set()
    if arch in _UNCALLED:
        expected |= {f"{_UNCALLED[arch][0]}.weight", f"{_UNCALLED[arch][0]}.bias"}
    for spec, layer, pairs in _pairs(model):
        for k, (var, fn) in pairs.items():
            _assign(sd, k, var, fn, arch)
            expected.add(k)
    extra = set(sd) - expected
    if extra:
        raise ValueError(
            f"unexpected keys in {arch} state dict: {sorted(extra)[:6]}"
            + (" (a module checkpoint? load the base model's state dict)" if any("module_head" in k for k in extra) else "")
        )
    return model


def _pairs(model: MaskedCNN):
    """(spec or FC name, layer, {state-dict key: (our variable, torch -> ours)}) of every layer."""
    conv, bn, fcs = LAYOUTS[model.arch]
    for spec in model.topology:
        layer = getattr(model, spec.name)
        c = conv.format(spec.name)
        pairs = {f"{c}.weight": (layer.kernel, lambda a: a.transpose(2, 3, 1, 0)), f"{c}.bias": (layer.bias, None)}
        if bn:
            b = bn.format(spec.name)
            pairs.update({f"{b}.weight": (layer.scale, None), f"{b}.bias": (layer.offset, None),
                          f"{b}.running_mean": (layer.mean, None), f"{b}.running_var": (layer.var, None)})
        yield spec, layer, pairs
    for j, (ours, theirs) in enumerate(fcs.items()):
        layer = getattr(model, ours)
        to_ours = _fc_from_torch(model.fc_positions) if j == 0 and model.fc_positions > 1 else (lambda a: a.T)
        yield ours, layer, {f"{theirs}.weight": (layer.kernel, to_ours), f"{theirs}.bias": (layer.bias, None)}


def _assign(sd, key, var, fn, arch):
    if key not in sd:
        raise ValueError(f"not a reference {arch} state dict: missing key {key!r}")
    a = sd[key].astype(np.float32)
    if fn is not None:
        a = fn(a)
    if a.shape != tuple(var.shape):
        raise ValueError(f"{key}: shape {a.shape} does not fit {arch} (expected {tuple(var.shape)})")
    var[...] = a


def to_torch_state_dict(model: MaskedCNN) -> dict[str, np.ndarray]:
    """The reference-layout state dict (NumPy arrays) of ``model``; inverse of the loader."""
    _check_arch(model.arch)
    out = {}
    first_fc = f"{LAYOUTS[model.arch][2][model.fc_layers[0]]}.weight"
    for _, _, pairs in _pairs(model):
        for k, (var, fn) in pairs.items():
            a = np.asarray(var[...])
            # the inverse of torch -> ours: kernels HWIO -> OIHW, FC (in, out) -> (out, in)
            if fn is None:
                out[k] = a
            elif a.ndim == 4:
                out[k] = a.transpose(3, 2, 0, 1)
            else:
                out[k] = _fc_to_torch(a, model.fc_positions) if k == first_fc else a.T
    if model.arch in _UNCALLED:
        prefix, like = _UNCALLED[model.arch]
        out[f"{prefix}.weight"] = np.zeros_like(out[f"{LAYOUTS[model.arch][0].format(like)}.weight"])
        out[f"{prefix}.bias"] = np.zeros_like(out[f"{LAYOUTS[model.arch][0].format(like)}.bias"])
    return out


def torch_model(model_or_arch, **kwargs):
    """A PyTorch ``nn.Module`` with the reference layout of ``model_or_arch``.

    Pass one of our models (its structure is copied, weights too) or an architecture name
    plus ``build_model`` keyword arguments (fresh weights).
    """
    import torch
    from torch import nn

    src = model_or_arch if isinstance(model_or_arch, MaskedCNN) else build_model(model_or_arch, **kwargs)
    arch = src.arch
    if arch not in ("simcnn", "rescnn", "incecnn"):
        raise ValueError(f"torch_model builds GradSplitter's layouts (simcnn, rescnn, incecnn), not {arch!r}")
    out_ch = {s.name: s.out_channels for s in src.topology}

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.arch = arch
            self.topology = src.topology
            for s in src.topology:
                cin = sum(out_ch[i] for i in s.inputs) if s.inputs else src.in_channels
                setattr(
                    self,
                    s.name,
                    nn.Sequential(
                        nn.Conv2d(cin, s.out_channels, s.ksize, padding=(s.ksize - 1) // 2),
                        nn.BatchNorm2d(s.out_channels),
                    ),
                )
            if arch == "simcnn":
                self.fc_13 = nn.Linear(src.fc_in, src.fc_hidden)
                self.fc_14 = nn.Linear(src.fc_hidden, src.fc_hidden)
                self.fc_15 = nn.Linear(src.fc_hidden, src.num_classes)
            else:
                self.fc_12 = nn.Linear(src.fc_in, src.num_classes)
            self.mask_of = {s.name: s.mask for s in src.topology}

        def _l(self, name, x, masks):
            y = torch.relu(getattr(self, name)(x))
            if masks is not None and self.mask_of[name] in masks:
                y = y * masks[self.mask_of[name]].view(1, -1, 1, 1)
            return y

        def features(self, x, masks=None):
            return _torch_features(arch, lambda n, h: self._l(n, h, masks), x)

        def forward(self, x, masks=None):
            h = self.features(x, masks)
            if arch == "simcnn":
                h = torch.relu(self.fc_13(nn.functional.dropout(h, 0.5, self.training)))
                h = torch.relu(self.fc_14(nn.functional.dropout(h, 0.5, self.training)))
                return self.fc_15(h)
            p = 0.5 if arch == "rescnn" else 0.4
            return self.fc_12(nn.functional.dropout(h, p, self.training))

    ref = Ref()
    if isinstance(model_or_arch, MaskedCNN):
        ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(src).items()}, strict=False)
    return ref.eval()


def _torch_features(arch: str, L, x):
    """The reference's conv stack of ``arch`` in PyTorch (NCHW): ``L(name, h)`` one masked
    conv + BN + ReLU layer; returns the FC input."""
    import torch

    pool = lambda h: torch.max_pool2d(h, 2, 2)  # noqa: E731
    if arch == "simcnn":
        for i in range(13):
            x = L(f"conv_{i}", x)
            if i in (1, 3, 6, 9, 12):
                x = pool(x)
        return x.flatten(1)
    if arch == "rescnn":
        x = pool(L("conv_1", L("conv_0", x)))
        x = L("conv_3", L("conv_2", x)) + x
        x = pool(L("conv_5", pool(L("conv_4", x))))
        x = L("conv_7", L("conv_6", x)) + x
        x = pool(L("conv_9", pool(L("conv_8", x))))
        x = L("conv_11", L("conv_10", x)) + x
        return x.flatten(1)
    x = pool(L("conv_2", L("conv_1", L("conv_0", x))))
    for b, first in enumerate((3, 6, 9)):
        x = torch.cat([L(f"conv_{first + j}", x) for j in range(3)], 1)
        if b < 2:
            x = pool(x)
    return x.mean((2, 3))
