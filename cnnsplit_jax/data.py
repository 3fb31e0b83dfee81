"""Named datasets as NumPy arrays plus metadata; seeded splits, Dirichlet subsampling, batches.

Every loader returns a ``Dataset``: uint8 images ``[N, 32, 32, C]`` (NHWC; 28x28 sources are
zero-padded to 32x32; 8x8 digits are bilinearly resized), int32 labels ``[N]``, and
``DatasetInfo`` (class names, channels, per-channel normalisation mean/std on the [0, 1]
scale). Normalisation is applied on the fly by ``normalize`` (also inside jit).

Sources, in the order they are tried:

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images); no network. Split into a fixed
  train/test partition (last 20% of a seed-0 permutation is the test set).
* ``fashion_mnist`` / ``mnist``: IDX files (``*-images-idx3-ubyte[.gz]``) in
  ``$CNNSPLIT_DATA/<name>/``, ``$CNNSPLIT_DATA``, then ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist``); else TFDS.
* ``cifar10`` / ``cifar100``: a CIFAR "python batches" directory (``data_batch_1``..., or
  ``train``/``test`` for CIFAR-100) under ``$CNNSPLIT_DATA``; else TFDS.
* ``svhn_cropped``: TFDS.

TFDS is read with ``tfds.data_source`` (array_record; no TensorFlow needed once prepared).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

__all__ = [
    "Dataset",
    "DatasetInfo",
    "DatasetError",
    "DATASETS",
    "load_dataset",
    "read_idx",
    "normalize",
    "train_val_split",
    "test_splits",
    "dirichlet_subsample",
    "batches",
    "select_classes",
    "Task",
    "make_task",
    "parse_classes",
    "parse_task",
    "load_task",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


class DatasetError(RuntimeError):
    """A dataset is unknown, missing, or malformed; the message says how to obtain it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a dataset.

    Attributes:
      name: dataset name as passed to ``load_dataset``.
      class_names: one name per class (``num_classes`` entries).
      channels: image channels (1 or 3).
      mean, std: per-channel normalisation on the [0, 1] scale.
      source: where the arrays came from (a path, ``sklearn`` or ``tfds``).
    """

    name: str
    class_names: tuple[str, ...]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes
        return d


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays: x uint8 [N, 32, 32, C], y int32 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: DatasetInfo


FASHION_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DIGIT_NAMES = tuple(str(i) for i in range(10))


# --------------------------------------------------------------------------- helpers
def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """uint8 images [..., C] -> float32 ``(x / 255 - mean) / std`` (NumPy or JAX arrays)."""
    if hasattr(x, "__jax_array__") or type(x).__module__.startswith("jax"):
        import jax.numpy as jnp

        xp = jnp
    else:
        xp = np
    m = xp.asarray(mean, dtype=xp.float32)
    s = xp.asarray(std, dtype=xp.float32)
    return (x.astype(xp.float32) / 255.0 - m) / s


def _pad_to_32(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[1:3]
    if (h, w) == (32, 32):
        return x
    if h > 32 or w > 32:
        raise DatasetError(f"images of size {h}x{w} are larger than 32x32")
    top, left = (32 - h) // 2, (32 - w) // 2
    return np.pad(x, ((0, 0), (top, 32 - h - top), (left, 32 - w - left), (0, 0)))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a NumPy array of its declared shape.

    Raises ``DatasetError`` on a bad magic number, unsupported type or truncated data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DatasetError(f"{path}: unsupported IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dt = np.dtype(dtypes[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dt.itemsize:
        raise DatasetError(
            f"{path}: truncated IDX data ({len(raw) - offset} bytes, need {count * dt.itemsize})"
        )
    arr = np.frombuffer(raw, dtype=dt, count=count, offset=offset).reshape(shape)
    return arr.astype(dt.newbyteorder("="))


def _find_idx(dirs: Sequence[Path], stem: str) -> Path | None:
    for d in dirs:
        for suffix in ("", ".gz"):
            p = d / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def _data_dirs(name: str, data_dir: str | None) -> list[Path]:
    dirs = []
    for root in (data_dir, os.environ.get("CNNSPLIT_DATA")):
        if root:
            dirs += [Path(root) / name, Path(root)]
    return dirs


# --------------------------------------------------------------------------- loaders
def _load_digits(data_dir=None) -> Dataset:
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    d = load_digits()
    img = d.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    big = zoom(img, (1, 4, 4), order=1)  # bilinear 8x8 -> 32x32
    x = np.clip(np.round(big * 255), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.RandomState(0).permutation(len(y))
    n_test = len(y) // 5
    tr, te = perm[:-n_test], perm[-n_test:]
    mean, std = _stats(x[tr])
    info = DatasetInfo("digits", DIGIT_NAMES, 1, mean, std, "sklearn")
    return Dataset(x[tr], y[tr], x[te], y[te], info)


def _stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale of uint8 images [N, H, W, C] (chunked)."""
    c = x.shape[-1]
    s1, s2, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(x), 8192):
        f = x[i : i + 8192].reshape(-1, c).astype(np.float64) / 255.0
        s1 += f.sum(0)
        s2 += np.square(f).sum(0)
        n += f.shape[0]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return tuple(np.round(mean, 4).tolist()), tuple(np.round(std, 4).tolist())


def _load_idx_dataset(name: str, data_dir=None) -> Dataset:
    dirs = _data_dirs(name, data_dir)
    if name == "fashion_mnist":
        dirs.append(DEBIAN_FASHION)
    files = {
        k: _find_idx(dirs, stem)
        for k, stem in {
            "xtr": "train-images-idx3-ubyte",
            "ytr": "train-labels-idx1-ubyte",
            "xte": "t10k-images-idx3-ubyte",
            "yte": "t10k-labels-idx1-ubyte",
        }.items()
    }
    if all(files.values()):
        arrs = {k: read_idx(p) for k, p in files.items()}
        for split in ("tr", "te"):
            if arrs["x" + split].shape[0] != arrs["y" + split].shape[0]:
                raise DatasetError(
                    f"{name}: {files['x' + split]} has {arrs['x' + split].shape[0]} images but "
                    f"{files['y' + split]} has {arrs['y' + split].shape[0]} labels"
                )
        names = FASHION_NAMES if name == "fashion_mnist" else DIGIT_NAMES
        xtr = _pad_to_32(arrs["xtr"][..., None])
        mean, std = _stats(xtr)  # of the padded 32x32 images
        info = DatasetInfo(name, names, 1, mean, std, str(files["xtr"].parent))
        return Dataset(
            xtr,
            arrs["ytr"].astype(np.int32),
            _pad_to_32(arrs["xte"][..., None]),
            arrs["yte"].astype(np.int32),
            info,
        )
    try:
        return _load_tfds(name, data_dir)
    except DatasetError as e:
        looked = ", ".join(str(d) for d in dirs) or "(no directory)"
        hint = (
            "`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist; "
            if name == "fashion_mnist"
            else ""
        )
        raise DatasetError(
            f"dataset {name!r} not found: no IDX files (train-images-idx3-ubyte[.gz], ...) in "
            f"{looked}, and TFDS failed ({e}). {hint}Put the four IDX files in "
            f"$CNNSPLIT_DATA/{name}/, or prepare it with TFDS "
            f"(`tfds build {name}` on a machine with network)."
        ) from None


def _unpickle(p: Path):
    with open(p, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar_batches(name: str, data_dir=None) -> Dataset | None:
    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    for d in _data_dirs(name, data_dir):
        for root in (d / sub, d):
            if name == "cifar10" and (root / "data_batch_1").is_file():
                tr = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6)]
                te = _unpickle(root / "test_batch")
                meta = _unpickle(root / "batches.meta") if (root / "batches.meta").is_file() else {}
                xtr = np.concatenate([b["data"] for b in tr])
                ytr = np.concatenate([b["labels"] for b in tr])
                xte, yte = te["data"], np.asarray(te["labels"])
                names = tuple(meta.get("label_names", CIFAR10_NAMES))
            elif name == "cifar100" and (root / "train").is_file():
                tr, te = _unpickle(root / "train"), _unpickle(root / "test")
                meta = _unpickle(root / "meta") if (root / "meta").is_file() else {}
                xtr, ytr = tr["data"], np.asarray(tr["fine_labels"])
                xte, yte = te["data"], np.asarray(te["fine_labels"])
                names = tuple(meta.get("fine_label_names", [str(i) for i in range(100)]))
            else:
                continue
            to_nhwc = lambda a: a.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)  # noqa: E731
            info = DatasetInfo(name, names, 3, IMAGENET_MEAN, IMAGENET_STD, str(root))
            return Dataset(
                to_nhwc(xtr), ytr.astype(np.int32), to_nhwc(xte), yte.astype(np.int32), info
            )
    return None


def _load_cifar(name: str, data_dir=None) -> Dataset:
    ds = _cifar_batches(name, data_dir)
    if ds is not None:
        return ds
    try:
        return _load_tfds(name, data_dir)
    except DatasetError as e:
        raise DatasetError(
            f"dataset {name!r} not found: no CIFAR python-batches directory under "
            f"$CNNSPLIT_DATA or --data-dir, and TFDS failed ({e}). Unpack the CIFAR python "
            f"archive into $CNNSPLIT_DATA/{name}/, or prepare it with TFDS "
            f"(`tfds build {name}` on a machine with network)."
        ) from None


def _load_svhn(name: str, data_dir=None) -> Dataset:
    try:
        return _load_tfds(name, data_dir)
    except DatasetError as e:
        raise DatasetError(
            f"dataset {name!r} not found: TFDS failed ({e}). Prepare it with TFDS "
            f"(`tfds build svhn_cropped` on a machine with network, then copy its data_dir "
            f"and pass --data-dir or set TFDS_DATA_DIR)."
        ) from None


def _load_tfds(name: str, data_dir=None) -> Dataset:
    """Read a prepared TFDS dataset with ``tfds.data_source`` (no TensorFlow)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        raise DatasetError(f"tensorflow-datasets is not installed ({e})") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        out = {}
        for split in ("train", "test"):
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            try:  # batched read (array_record); mocked sources only support indexing
                items = src.__getitems__(list(range(len(src))))
            except TypeError:
                items = [src[i] for i in range(len(src))]
            x = np.stack([np.asarray(it["image"]) for it in items])
            y = np.asarray([int(it["label"]) for it in items], dtype=np.int32)
            out[split] = (x, y)
        names = tuple(builder.info.features["label"].names)
    except Exception as e:  # tfds raises many types for "not prepared"
        raise DatasetError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    (xtr, ytr), (xte, yte) = out["train"], out["test"]
    if xtr.ndim == 3:
        xtr, xte = xtr[..., None], xte[..., None]
    xtr, xte = _pad_to_32(xtr.astype(np.uint8)), _pad_to_32(xte.astype(np.uint8))
    ch = xtr.shape[-1]
    if ch == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = _stats(xtr)
    info = DatasetInfo(name, names, ch, mean, std, "tfds")
    return Dataset(xtr, ytr, xte, yte, info)


DATASETS = {
    "digits": lambda data_dir=None: _load_digits(data_dir),
    "fashion_mnist": lambda data_dir=None: _load_idx_dataset("fashion_mnist", data_dir),
    "mnist": lambda data_dir=None: _load_idx_dataset("mnist", data_dir),
    "cifar10": lambda data_dir=None: _load_cifar("cifar10", data_dir),
    "cifar100": lambda data_dir=None: _load_cifar("cifar100", data_dir),
    "svhn_cropped": lambda data_dir=None: _load_svhn("svhn_cropped", data_dir),
}


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Load a named dataset (see module docstring for sources).

    Raises:
      DatasetError: unknown name, or no source found (the message says how to obtain it).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[name](data_dir)


# --------------------------------------------------------------------------- splits
def train_val_split(n: int, seed: int, val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of ``range(n)``; first ``1 - val_fraction`` -> train, rest -> val.

    The reference splits its (sub)sample 80/20 in order; the same seed gives the same split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.RandomState(seed).permutation(n)
    n_train = int(round(n * (1.0 - val_fraction)))
    return perm[:n_train], perm[n_train:]


def test_splits(n: int, eval_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """The reference's test-set split, in file order: first ``eval_fraction`` -> module
    evaluation set (choosing modules, F1), the rest -> final test set."""
    k = int(round(n * eval_fraction))
    return np.arange(k), np.arange(k, n)


def select_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """The images of ``classes`` only, relabelled ``0..k-1`` in the given order (train and
    test alike); normalisation statistics are those of the full dataset."""
    classes = [int(c) for c in classes]
    n = ds.info.num_classes
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise ValueError(f"unknown class index {bad} for {ds.info.name!r} (classes 0..{n - 1})")
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"need at least 2 distinct classes, got {classes}")
    lut = np.full(n, -1, np.int64)
    lut[classes] = np.arange(len(classes))

    def pick(x, y):
        keep = lut[y] >= 0
        return x[keep], lut[y[keep]].astype(np.int32)

    xtr, ytr = pick(ds.x_train, ds.y_train)
    xte, yte = pick(ds.x_test, ds.y_test)
    info = dataclasses.replace(ds.info, name=f"{ds.info.name}[{','.join(map(str, classes))}]",
                               class_names=tuple(ds.info.class_names[c] for c in classes))
    return Dataset(xtr, ytr, xte, yte, info)


class Task(NamedTuple):
    """A classification task made of classes of one or more datasets.

    ds: training images of the chosen classes (all parts) and, as ``x_test``, the final-test
    images (last 80% of each part's test set); x_eval / y_eval: the module-evaluation images
    (first 20% of each part's test set); sources: ``(dataset, class)`` of every task label.
    """

    ds: Dataset
    x_eval: np.ndarray
    y_eval: np.ndarray
    sources: tuple


def make_task(parts: Sequence[tuple[Dataset, Sequence[int]]], eval_fraction: float = 0.2) -> Task:
    """Merge ``(dataset, classes)`` parts into one task; labels follow the parts' order.

    The reference's test split is applied to each part's test set in file order before the
    classes are selected, so every image keeps its role (evaluation or test). Normalisation:
    a single part keeps its dataset's statistics, several parts get those of the merged
    training images. Raises ValueError on mixed channels or unknown classes.
    """
    if not parts:
        raise ValueError("make_task needs at least one (dataset, classes) part")
    chans = {d.info.channels for d, _ in parts}
    if len(chans) != 1:
        raise ValueError(f"datasets have different channels {sorted(chans)}; cannot merge them")
    xs = {k: [] for k in ("xtr", "ytr", "xev", "yev", "xte", "yte")}
    names, sources, off = [], [], 0
    for d, classes in parts:
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < d.info.num_classes]
        if bad:
            raise ValueError(f"unknown class index {bad} for {d.info.name!r} "
                             f"(classes 0..{d.info.num_classes - 1})")
        lut = np.full(d.info.num_classes, -1, np.int64)
        lut[classes] = np.arange(len(classes)) + off
        ev, te = test_splits(len(d.y_test), eval_fraction)
        for (kx, ky), (x, y) in zip(
            (("xtr", "ytr"), ("xev", "yev"), ("xte", "yte")),
            ((d.x_train, d.y_train), (d.x_test[ev], d.y_test[ev]), (d.x_test[te], d.y_test[te])),
        ):
            keep = lut[y] >= 0
            xs[kx].append(x[keep])
            xs[ky].append(lut[y[keep]].astype(np.int32))
        names += [d.info.class_names[c] for c in classes]
        sources += [(d.info.name, c) for c in classes]
        off += len(classes)
    cat = {k: np.concatenate(v) for k, v in xs.items()}
    first = parts[0][0].info
    if len(parts) == 1:
        mean, std = first.mean, first.std
    else:
        mean, std = _stats(cat["xtr"])
    info = DatasetInfo("+".join(d.info.name for d, _ in parts), tuple(names), first.channels,
                       tuple(mean), tuple(std), "merged")
    ds = Dataset(cat["xtr"], cat["ytr"], cat["xte"], cat["yte"], info)
    return Task(ds, cat["xev"], cat["yev"], tuple(sources))


def parse_classes(spec: str) -> list[int]:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]`` (order kept)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"bad class list {spec!r}: expected integers and ranges like 0,2,5-7") from None
    return out


def parse_task(spec: str) -> list[tuple[str, list[int] | None]]:
    """``"NAME[:CLASSES][+NAME[:CLASSES]...]"`` -> ``[(name, classes or None)]``.

    Examples: ``"digits"``, ``"digits:0-8"``, ``"fashion_mnist:0,1+digits:3,4"``.
    """
    parts = []
    for item in spec.split("+"):
        name, _, classes = item.partition(":")
        if name not in DATASETS:
            raise DatasetError(f"unknown dataset {name!r} in {spec!r}; expected one of {sorted(DATASETS)}")
        parts.append((name, parse_classes(classes) if classes else None))
    return parts


def load_task(spec: str, data_dir: str | None = None) -> Task:
    """Load a task spec (``parse_task``) as a ``Task`` (see ``make_task``)."""
    loaded: dict[str, Dataset] = {}
    parts = []
    for name, classes in parse_task(spec):
        if name not in loaded:
            loaded[name] = load_dataset(name, data_dir)
        d = loaded[name]
        parts.append((d, classes if classes is not None else list(range(d.info.num_classes))))
    return make_task(parts)


def dirichlet_subsample(
    labels: np.ndarray, seed: int, alpha: float = 1.0, min_size: int = 100
) -> np.ndarray:
    """The reference's non-IID subsample: indices into ``labels``.

    Repeats: draw p ~ Dirichlet(alpha), p /= max(p); for every class keep the first
    ``int(p_c * n_c)`` of that class's shuffled indices; until every class keeps at least
    ``min_size``. Then concatenate per class and shuffle. Uses NumPy's legacy ``RandomState``
    stream like the reference (CIFAR-10: alpha 1, min 100; SVHN: alpha 0.5, min 10).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rs = np.random.RandomState(seed)
    for _ in range(10_000):
        p = rs.dirichlet(alpha * np.ones(len(classes)))
        p = p / p.max()
        chosen = []
        for c, pc in zip(classes, p):
            idx = np.where(labels == c)[0]
            rs.shuffle(idx)
            chosen.append(idx[: int(pc * len(idx))])
        if min(len(c) for c in chosen) >= min_size:
            out = np.concatenate(chosen)
            rs.shuffle(out)
            return out
    raise ValueError(
        f"dirichlet_subsample: no draw kept >= {min_size} images of every class after 10000 "
        f"tries (alpha={alpha}); lower min_size"
    )


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
