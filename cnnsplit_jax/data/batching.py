"""Normalisation and batching: index batches for training loops, and the one helper that runs a
function over padded batches of arrays (``map_batches`` / ``sum_batches``).

Padding the last batch to a full one (by repeating its last row) means a jitted function
compiles for a single batch shape; the padded rows are cut from concatenated outputs, and
reductions get a ``valid`` mask that is 0 on them.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from .. import distributed as dist

__all__ = ["Normalization", "normalize", "fit_images", "batches", "map_batches", "sum_batches", "check_images", "check_labels", "to_uint8"]

_FLOAT_HINT = ("convert float images with cnnsplit_jax.data.to_uint8(x, scale=1.0) (pixels in [0, 1]) or "
               "scale=255.0 (pixels in [0, 255]), which checks their range")


def check_images(x, name: str = "images", ndim: int | None = 4) -> None:
    """Raise ``ValueError`` unless ``x`` holds uint8 pixels (``[N, H, W, C]`` when ``ndim`` is
    4): float images are refused rather than guessed at (a [0, 1] float divided by 255 again
    would quietly give near-constant inputs)."""
    dt = np.dtype(x.dtype)
    if dt != np.uint8:
        raise ValueError(f"{name} must be uint8 pixels in [0, 255], got dtype {dt}; " + (
            _FLOAT_HINT if dt.kind == "f" else "convert them with x.astype(np.uint8) if that is what they are"))
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(f"{name} must be [N, H, W, C] (NHWC), got shape {tuple(x.shape)}")


def check_labels(y, name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``y`` is a 1-D array of integer class indices (float labels
    are refused, not truncated)."""
    dt = np.dtype(y.dtype)
    if dt.kind not in "iu":
        raise ValueError(f"{name} must be integer class indices, got dtype {dt}")
    if len(y.shape) != 1:
        raise ValueError(f"{name} must be one index per image [N], got shape {tuple(y.shape)}")


def to_uint8(x, scale: float = 1.0) -> np.ndarray:
    """Float images with pixels in ``[0, scale]`` as uint8 ``round(x / scale * 255)``.

    Raises:
      ValueError: NaN or infinite pixels, or pixels outside ``[0, scale]``.
    """
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"images hold {int((~np.isfinite(x)).sum())} NaN or infinite pixels")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < -1e-6 * scale or hi > scale * (1 + 1e-6):
        raise ValueError(f"pixels lie in [{lo:g}, {hi:g}], outside [0, {scale:g}]: pass the scale they are on")
    return np.clip(np.round(x / scale * 255.0), 0, 255).astype(np.uint8)


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """uint8 images [..., C] -> float32 ``(x / 255 - mean) / std`` (NumPy or JAX arrays; the
    one normalisation formula). Other dtypes are refused (``check_images``)."""
    check_images(x, ndim=None)
    if hasattr(x, "__jax_array__") or type(x).__module__.startswith("jax"):
        import jax.numpy as jnp

        xp = jnp
    else:
        xp = np
    m = xp.asarray(mean, dtype=xp.float32)
    s = xp.asarray(std, dtype=xp.float32)
    return (x.astype(xp.float32) / 255.0 - m) / s


class Normalization(NamedTuple):
    """Per-channel input normalisation on the [0, 1] scale, the one value data sets, training,
    splitters, module sets, composition and reuse pass around: ``(x / 255 - mean) / std``.

    A pytree (a NamedTuple of two tuples of floats; ``mean, std = norm`` unpacks it).
    ``norm(x)`` normalises uint8 images ``[..., C]`` (``normalize``); ``to_json()`` is the
    ``{"mean": [...], "std": [...]}`` that run directories and module sets store;
    ``Normalization.of(value)`` reads that dict, a ``(mean, std)`` pair, or anything with a
    ``normalization`` attribute (``DatasetInfo``, ``SplitData``, module sets).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, value) -> "Normalization":
        if isinstance(value, Normalization):
            return value
        if isinstance(value, Mapping):
            mean, std = value["mean"], value["std"]
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            mean, std = value
        else:
            return cls.of(value.normalization)
        if np.ndim(mean) != 1 or np.ndim(std) != 1:
            raise ValueError(f"mean and std must be sequences, one value per channel; got {mean!r} and {std!r}")
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def __call__(self, x):
        return normalize(x, self.mean, self.std)

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    def check(self, channels: int) -> None:
        """ValueError unless there is one finite mean and one finite positive std per channel."""
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        if mean.shape != (channels,) or std.shape != (channels,) or not np.isfinite(mean).all() \
                or not (std > 0).all():
            raise ValueError(f"mean and std must be {channels} finite values (std > 0), one per channel; got "
                             f"{list(self.mean)} and {list(self.std)}")


def batches(
    n: int, batch_size: int, *, key=None, drop_last: bool = False
) -> Iterator[np.ndarray]:
    """Index batches over ``range(n)``; shuffled with ``jax.random`` ``key`` when given."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if key is not None:
        import jax

        order = np.asarray(jax.random.permutation(key, n))
    else:
        order = np.arange(n)
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def _padded(arrays: Sequence, start: int, batch_size: int, pad: bool):
    """Rows ``start:start + batch_size`` of every array (the last batch repeated up to a full
    batch when ``pad``) and the number of real rows."""
    part = [a[start:start + batch_size] for a in arrays]
    m = len(part[0])
    if pad and m < batch_size:
        part = [np.concatenate([p, np.repeat(p[-1:], batch_size - m, 0)]) for p in part]
    return part, m


def _check(arrays: Sequence, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sizes = {len(a) for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"arrays disagree on their leading size: {sorted(sizes)}")
    return sizes.pop()


def map_batches(
    fn: Callable,
    arrays: Sequence,
    batch_size: int = 256,
    *,
    pad: bool = True,
    axis: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
):
    """``fn(*batch)`` over consecutive batches of the leading axis of ``arrays``.

    Args:
      fn: takes one batch of each array; returns an array or a pytree of arrays whose axis
        ``axis`` is the batch axis.
      arrays: NumPy (or JAX) arrays sharing their leading size n.
      pad: fill the last batch up to ``batch_size`` by repeating its last row, so ``fn``
        compiles once, when there is more than one batch (padded rows are cut from the
        output); False: the last batch keeps its own size.
      on_batch: called with ``(batches done, batches in all)`` after each batch.

    Returns:
      The outputs concatenated along ``axis`` as NumPy arrays (n rows there; for n = 0, empty
      arrays of the output's shape).
    """
    n = _check(arrays, batch_size)
    if n == 0:
        spec = jax.eval_shape(fn, *[jax.ShapeDtypeStruct((1, *np.shape(a)[1:]), a.dtype) for a in arrays])
        return jax.tree.map(lambda s: np.zeros(tuple(0 if i == axis else d for i, d in enumerate(s.shape)),
                                               s.dtype), spec)
    steps = -(-n // batch_size)
    outs = []
    for i in range(steps):
        part, m = _padded(arrays, i * batch_size, batch_size, pad and steps > 1)
        out = dist.host(fn(*part))
        outs.append(jax.tree.map(lambda o: np.take(o, np.arange(m), axis=axis), out))
        if on_batch is not None:
            on_batch(i + 1, steps)
    return jax.tree.map(lambda *o: np.concatenate(o, axis=axis), *outs)


def sum_batches(
    fn: Callable,
    arrays: Sequence,
    batch_size: int = 256,
    *,
    on_batch: Callable[[int, int], None] | None = None,
):
    """Sum over batches of ``fn(*batch, valid)`` (an array or a pytree of arrays).

    Every batch has ``min(batch_size, n)`` rows (the last one padded by repeating its last
    row); ``valid`` is float32 ``[rows]``: 1 on real rows, 0 on padding, so ``fn`` must weigh
    each row's contribution by it. Sums are accumulated in float64 on the host. Returns None
    when the arrays are empty.
    """
    n = _check(arrays, batch_size)
    bs = min(batch_size, n)
    steps = -(-n // bs) if n else 0
    total = None
    for i in range(steps):
        part, m = _padded(arrays, i * bs, bs, True)
        valid = (np.arange(bs) < m).astype(np.float32)
        out = jax.tree.map(lambda o: o.astype(np.float64), dist.host(fn(*part, valid)))
        total = out if total is None else jax.tree.map(np.add, total, out)
        if on_batch is not None:
            on_batch(i + 1, steps)
    return total


def fit_images(x: np.ndarray, shape) -> np.ndarray:
    """Images ``[N, H, W, C]`` as a model reading ``shape`` (H', W', C) takes them: centre crops
    when H' <= H and W' <= W (Fashion-MNIST's 28x28 inside the loader's 32x32 padding).

    Raises:
      ValueError: larger images than the dataset's, or other channels.
    """
    h, w, c = (int(v) for v in shape)
    if x.shape[1:] == (h, w, c):
        return x
    if x.shape[3] != c or h > x.shape[1] or w > x.shape[2]:
        raise ValueError(f"the model reads images {[h, w, c]}, the dataset's are {list(x.shape[1:])}: "
                         "only centre crops of the same channels are taken")
    top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
    return x[:, top:top + h, left:left + w]
