"""The original SVHN files (``train_32x32.mat`` / ``test_32x32.mat``), read with SciPy in file
order, as torchvision's ``SVHN`` (which the reference uses) reads them."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["read_svhn_mat"]


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels int32 [N] of an original SVHN ``*_32x32.mat``
    (``X`` [32, 32, 3, N], ``y`` [N, 1] with 10 for the digit 0), in file order, label 10 -> 0.
    ValueError naming the file when it is not one."""
    from scipy.io import loadmat

    try:
        m = loadmat(os.fspath(path))
        x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1).astype(np.int64)
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise ValueError(f"{path}: not an SVHN *_32x32.mat file ({type(e).__name__}: {e})") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ValueError(f"{path}: X has shape {x.shape}, expected [32, 32, 3, N] with N = {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise ValueError(f"{path}: labels outside 0..10 ({y.min()}..{y.max()})")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2).astype(np.uint8)), y.astype(np.int32)
