"""Splits and tasks: the seeded train/validation split, the reference's test-set split and
non-IID Dirichlet subsample, class selection, and tasks made of classes of several datasets
(``NAME:CLASSES[+NAME:CLASSES]`` specs).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from .sources import DATASETS, Dataset, DatasetError, DatasetInfo, image_stats, load_dataset

__all__ = ["train_val_split", "split_indices", "test_splits", "dirichlet_subsample", "select_classes", "Task",
           "make_task", "parse_classes", "parse_task", "load_task", "is_task_spec", "EstimatorRecipe",
           "ESTIMATOR_RECIPES", "estimator_recipe", "SPLIT_SCHEMES", "CNNSPLITTER_SEED", "holdout_split",
           "class_holdout"]

#: ``seeded``: our seeded permutation (the run's seed; ``round`` for the cut); ``cnnsplitter``:
#: CNNSplitter's (``utils/dataset_loader.py``: ``np.random.seed(1009)``, shuffle, ``int(0.8 n)``)
SPLIT_SCHEMES = ("seeded", "cnnsplitter")
CNNSPLITTER_SEED = 1009


def holdout_split(n: int, seed: int = CNNSPLITTER_SEED, train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """CNNSplitter's split of ``range(n)``: shuffled by NumPy's legacy stream seeded ``seed``,
    the first ``int(train_fraction * n)`` for training, the rest held out."""
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    cut = int(train_fraction * n)
    return idx[:cut], idx[cut:]


def class_holdout(labels: np.ndarray, c: int, seed: int = CNNSPLITTER_SEED, train_fraction: float = 0.8) -> np.ndarray:
    """Indices into ``labels`` of CNNSplitter's kernel-importance images of class ``c``: the
    class's images in file order, split by ``holdout_split`` (its per-class loader), the held-out
    tail."""
    own = np.flatnonzero(np.asarray(labels) == c)
    return own[holdout_split(len(own), seed, train_fraction)[1]]


class EstimatorRecipe(NamedTuple):
    """The Dirichlet subsample of one base estimator: concentration ``alpha`` and the least
    images every class keeps (``min_size``)."""

    alpha: float
    min_size: int


#: GradSplitter's estimator samples per dataset (``utils/dataset_loader.py``: CIFAR-10 alpha 1,
#: min_size 100; SVHN alpha 0.5, min_size 10)
ESTIMATOR_RECIPES: dict[str, EstimatorRecipe] = {
    "cifar10": EstimatorRecipe(1.0, 100),
    "svhn_cropped": EstimatorRecipe(0.5, 10),
}
#: other datasets (our choice: the CIFAR-10 recipe)
DEFAULT_ESTIMATOR = EstimatorRecipe(1.0, 100)


def estimator_recipe(dataset: str) -> EstimatorRecipe:
    """The reference's estimator recipe of ``dataset`` (a name, a task spec or a task's name
    such as ``svhn_cropped[0,1]``: its first dataset), ``DEFAULT_ESTIMATOR`` where the reference
    has none."""
    name = dataset.split("+")[0].split(":")[0].split("[")[0]
    return ESTIMATOR_RECIPES.get(name, DEFAULT_ESTIMATOR)


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
    _no_repeats([(d.info.name, int(c)) for d, cs in parts for c in cs], "the task's (dataset, class) pairs")
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
        mean, std = image_stats(cat["xtr"])
    info = DatasetInfo("+".join(d.info.name for d, _ in parts), tuple(names), first.channels,
                       tuple(mean), tuple(std), "merged")
    ds = Dataset(cat["xtr"], cat["ytr"], cat["xte"], cat["yte"], info)
    return Task(ds, cat["xev"], cat["yev"], tuple(sources))


def parse_classes(spec: str) -> list[int]:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]`` (order kept).

    Raises ValueError on anything else: a reversed range (``3-1``), a class named twice, or
    no class at all."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if a > b:
                    raise ValueError(f"bad class range {part!r} in {spec!r}: write it from the lower class ({b}-{a})")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError as e:
            if "class range" in str(e):
                raise
            raise ValueError(f"bad class list {spec!r}: expected integers and ranges like 0,2,5-7") from None
    if not out:
        raise ValueError(f"bad class list {spec!r}: no class given")
    _no_repeats(out, spec)
    return out


def _no_repeats(classes, where: str) -> None:
    seen, twice = set(), []
    for c in classes:
        if c in seen and c not in twice:
            twice.append(c)
        seen.add(c)
    if twice:
        raise ValueError(f"class(es) {twice} named more than once in {where!r}: a task's classes must be distinct "
                         "(a repeated class would be a degenerate task)")


def parse_task(spec: str) -> list[tuple[str, list[int] | None]]:
    """``"NAME[:CLASSES][+NAME[:CLASSES]...]"`` -> ``[(name, classes or None)]``.

    Examples: ``"digits"``, ``"digits:0-8"``, ``"fashion_mnist:0,1+digits:3,4"``.
    """
    parts = []
    for item in spec.split("+"):
        name, sep, classes = item.partition(":")
        if name not in DATASETS:
            raise DatasetError(f"unknown dataset {name!r} in {spec!r}; expected one of {sorted(DATASETS)}")
        if sep and not classes.strip():
            raise ValueError(f"no classes after {name + ':'!r} in {spec!r}; leave out the ':' for all classes")
        parts.append((name, parse_classes(classes) if sep else None))
    for name in {n for n, classes in parts if classes is None}:
        if sum(n == name for n, _ in parts) > 1:
            raise ValueError(f"{spec!r} takes every class of {name!r} and names it again: a task's classes must "
                             "be distinct")
    _no_repeats([f"{n}:{c}" for n, classes in parts for c in classes or ()], spec)
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




def is_task_spec(spec: str) -> bool:
    """True for a task spec (``digits:0-4``, ``a+b``), False for a plain dataset name."""
    return ":" in spec or "+" in spec


def split_indices(
    labels: np.ndarray,
    seed: int,
    val_fraction: float = 0.2,
    dirichlet_alpha: float | None = None,
    dirichlet_min_size: int = 100,
    scheme: str = "seeded",
    train_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices into the training set, as ``fit`` uses them.

    ``scheme="cnnsplitter"``: CNNSplitter's split (``holdout_split``: seed 1009, ``int``; the
    run's ``seed`` and ``val_fraction`` are not used; no Dirichlet subsample).

    Without ``dirichlet_alpha``: a seeded permutation, its first ``1 - val_fraction`` for
    training. With it: the reference's non-IID subsample (``data.dirichlet_subsample``, already
    shuffled), split *in order* as the reference does: its first ``int((1 - val_fraction) * n)``
    for training, the rest for validation. The splitters reuse the base model's split: their
    training data is its training part and their validation data its validation part.

    ``train_images``: keep only the first this many of the training part (already in a seeded
    random order; a CPU-sized run); the validation part is unchanged.
    """
    tr, va = _train_val(labels, seed, val_fraction, dirichlet_alpha, dirichlet_min_size, scheme)
    if train_images is not None:
        if not 1 <= int(train_images) <= len(tr):
            raise ValueError(f"train_images must lie in [1, {len(tr)}] (the training part), got {train_images}")
        tr = tr[:int(train_images)]
    return tr, va


def _train_val(labels, seed, val_fraction, dirichlet_alpha, dirichlet_min_size, scheme):
    if scheme not in SPLIT_SCHEMES:
        raise ValueError(f"split scheme {scheme!r}; expected one of {SPLIT_SCHEMES}")
    if scheme == "cnnsplitter":
        if dirichlet_alpha is not None:
            raise ValueError("the cnnsplitter split scheme has no Dirichlet subsample (CNNSplitter trains on "
                             "the whole training set)")
        return holdout_split(len(labels))
    if dirichlet_alpha is None:
        return train_val_split(len(labels), seed, val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    idx = dirichlet_subsample(labels, seed, dirichlet_alpha, dirichlet_min_size)
    n_train = int((1.0 - val_fraction) * len(idx))
    return idx[:n_train], idx[n_train:]
