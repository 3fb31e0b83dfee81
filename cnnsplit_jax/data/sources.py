"""Named datasets as NumPy arrays plus metadata; seeded splits, Dirichlet subsampling, batches.

Every loader returns a ``Dataset``: uint8 images ``[N, 32, 32, C]`` (NHWC; 28x28 sources are
zero-padded to 32x32; 8x8 digits are bilinearly resized), int32 labels ``[N]``, and
``DatasetInfo`` (class names, channels, per-channel normalisation mean/std on the [0, 1]
scale). Normalisation is applied on the fly by ``data.normalize`` (also inside jit).

Sources, in the order they are tried:

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images); no network. Split into a fixed
  train/test partition (last 20% of a seed-0 permutation is the test set).
* ``fashion_mnist`` / ``mnist``: IDX files (``*-images-idx3-ubyte[.gz]``) in
  ``$CNNSPLIT_DATA/<name>/``, ``$CNNSPLIT_DATA``, then ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist``); else TFDS.
* ``cifar10`` / ``cifar100``: a CIFAR "python batches" directory (``data_batch_1``..., or
  ``train``/``test`` for CIFAR-100) under ``$CNNSPLIT_DATA``; else TFDS.
* ``svhn_cropped``: the original ``train_32x32.mat`` / ``test_32x32.mat`` (SciPy) under
  ``$CNNSPLIT_DATA/svhn_cropped/``, ``$CNNSPLIT_DATA/svhn/`` or ``$CNNSPLIT_DATA``, in file order
  with label 10 -> 0 (as torchvision's ``SVHN``, which the reference reads); else TFDS, whose
  records are shuffled and carry no file index (a ``DatasetOrderWarning`` says so once).

TFDS is read with ``tfds.data_source`` (array_record; no TensorFlow needed once prepared).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .batching import Normalization, check_images, check_labels
from .svhn_mat import read_svhn_mat

__all__ = ["Dataset", "DatasetInfo", "DatasetError", "DatasetOrderWarning", "DATASETS", "load_dataset", "read_idx",
           "image_stats", "file_order", "read_svhn_mat"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


class DatasetError(RuntimeError):
    """A dataset is unknown, missing, or malformed; the message says how to obtain it."""


class DatasetOrderWarning(UserWarning):
    """The images are not in the original files' order, so order-based splits (the first 20%
    of the test set, seeded subsamples) select other images than the reference's."""


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

    @property
    def normalization(self) -> Normalization:
        return Normalization.of((self.mean, self.std))

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes
        return d


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays: x uint8 [N, H, W, C] (32 x 32 from the loaders), y integer [N].

    Raises ``ValueError`` on construction for float images, non-integer labels, or images and
    labels of different counts or channels other than ``info.channels``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: DatasetInfo

    def __post_init__(self):
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            check_images(x, f"{self.info.name} {part} images")
            check_labels(y, f"{self.info.name} {part} labels")
            if len(x) != len(y):
                raise ValueError(f"{self.info.name}: {len(x)} {part} images but {len(y)} labels")
            if x.shape[-1] != self.info.channels:
                raise ValueError(f"{self.info.name}: {part} images have {x.shape[-1]} channels, its info says "
                                 f"{self.info.channels}")


FASHION_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DIGIT_NAMES = tuple(str(i) for i in range(10))


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
    mean, std = image_stats(x[tr])
    info = DatasetInfo("digits", DIGIT_NAMES, 1, mean, std, "sklearn")
    return Dataset(x[tr], y[tr], x[te], y[te], info)


def image_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
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
        mean, std = image_stats(xtr)  # of the padded 32x32 images
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


#: what a CIFAR "python batches" file may construct: NumPy arrays and dtypes, nothing else
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar")}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and NumPy arrays only: a file
    naming any other class or function (code to run) is refused."""

    def find_class(self, module, name):
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds arrays only")


def _unpickle(p: Path):
    try:
        with open(p, "rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{p} is not a CIFAR python batch: {e}") from None


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


def _tfds_or_explain(name: str, data_dir, looked: str, how: str) -> Dataset:
    """``_load_tfds``, or a DatasetError that says where we looked and how to get the data."""
    try:
        return _load_tfds(name, data_dir)
    except DatasetError as e:
        raise DatasetError(f"dataset {name!r} not found: {looked}TFDS failed ({e}). {how}") from None


def _load_cifar(name: str, data_dir=None) -> Dataset:
    ds = _cifar_batches(name, data_dir)
    if ds is not None:
        return ds
    return _tfds_or_explain(
        name, data_dir, "no CIFAR python-batches directory under $CNNSPLIT_DATA or --data-dir, and ",
        f"Unpack the CIFAR python archive into $CNNSPLIT_DATA/{name}/, or prepare it with TFDS "
        f"(`tfds build {name}` on a machine with network).")


def _svhn_files(data_dir) -> Path | None:
    for d in _data_dirs("svhn_cropped", data_dir) + _data_dirs("svhn", data_dir):
        if (d / "train_32x32.mat").is_file() and (d / "test_32x32.mat").is_file():
            return d
    return None


_WARNED_ORDER: set = set()


def _load_svhn(name: str, data_dir=None) -> Dataset:
    root = _svhn_files(data_dir)
    if root is not None:
        try:
            xtr, ytr = read_svhn_mat(root / "train_32x32.mat")
            xte, yte = read_svhn_mat(root / "test_32x32.mat")
        except ValueError as e:
            raise DatasetError(str(e)) from None
        info = DatasetInfo(name, tuple(str(i) for i in range(10)), 3, IMAGENET_MEAN, IMAGENET_STD,
                           f"{root}, file order")
        return Dataset(xtr, ytr, xte, yte, info)
    ds = _tfds_or_explain(
        name, data_dir, "no train_32x32.mat / test_32x32.mat under $CNNSPLIT_DATA or --data-dir, and ",
        "Put the original SVHN .mat files in $CNNSPLIT_DATA/svhn_cropped/, or prepare it with TFDS "
        "(`tfds build svhn_cropped` on a machine with network, then copy its data_dir and pass --data-dir "
        "or set TFDS_DATA_DIR).")
    if name not in _WARNED_ORDER:
        _WARNED_ORDER.add(name)
        warnings.warn(f"{name} from TFDS: its records are shuffled and carry no file index, so the first 20% "
                      "of the test set, the Dirichlet subsample and the 80/20 splits select other images than "
                      "the reference's; put train_32x32.mat / test_32x32.mat in $CNNSPLIT_DATA/svhn_cropped/ "
                      "for the original order", DatasetOrderWarning, stacklevel=3)
    return ds


def file_order(ids) -> np.ndarray | None:
    """The permutation that restores the original file order of TFDS records from their
    ``id`` feature (CIFAR: ``"train_16399"``, the index in the original file); None when the
    ids are missing or do not all end in ``_<number>``."""
    nums = []
    for i in ids:
        i = i.decode() if isinstance(i, bytes) else str(i)
        head, _, tail = i.rpartition("_")
        if not head or not tail.isdigit():
            return None
        nums.append(int(tail))
    if len(set(nums)) != len(nums):
        return None
    return np.argsort(np.asarray(nums), kind="stable")


def _load_tfds(name: str, data_dir=None) -> Dataset:
    """Read a prepared TFDS dataset with ``tfds.data_source`` (no TensorFlow).

    TFDS shuffles records when it prepares a dataset. Where records carry an ``id`` with the
    original file index (CIFAR-10 / CIFAR-100), the original order is restored, so "the first
    20% of the test set" and seeded subsamples match the reference; SVHN and MNIST records carry
    no such id and stay in TFDS's order (``DatasetInfo.source`` says ``tfds`` or
    ``tfds, file order``)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        raise DatasetError(f"tensorflow-datasets is not installed ({e})") from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        out, orders = {}, []
        for split in ("train", "test"):
            src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            try:  # batched read (array_record); mocked sources only support indexing
                items = src.__getitems__(list(range(len(src))))
            except TypeError:
                items = [src[i] for i in range(len(src))]
            x = np.stack([np.asarray(it["image"]) for it in items])
            y = np.asarray([int(it["label"]) for it in items], dtype=np.int32)
            order = file_order([it["id"] for it in items]) if items and "id" in items[0] else None
            if order is not None:
                x, y = x[order], y[order]
            orders.append(order is not None)
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
        mean, std = image_stats(xtr)
    info = DatasetInfo(name, names, ch, mean, std, "tfds, file order" if all(orders) else "tfds")
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


