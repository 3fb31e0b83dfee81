import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnsplit_jax.data import (
    DatasetError,
    batches,
    dirichlet_subsample,
    load_dataset,
    normalize,
    parse_task,
    read_idx,
    select_classes,
    train_val_split,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    imgs = np.random.RandomState(0).randint(0, 256, (5, 28, 28)).astype(np.uint8)
    vals = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    _write_idx(tmp_path / ("a.gz" if gz else "a"), imgs, gz)
    _write_idx(tmp_path / ("b.gz" if gz else "b"), vals, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / ("a.gz" if gz else "a")), imgs)
    np.testing.assert_array_equal(read_idx(tmp_path / ("b.gz" if gz else "b")), vals)


def test_read_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "ok", np.zeros((4, 3), np.uint8), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-2])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "missing")


def _fake_mnist_dir(root: Path, n_train=12, n_test=6):
    d = root / "mnist"
    d.mkdir(parents=True)
    rs = np.random.RandomState(1)
    _write_idx(d / "train-images-idx3-ubyte.gz", rs.randint(1, 256, (n_train, 28, 28)).astype(np.uint8), True)
    _write_idx(d / "train-labels-idx1-ubyte.gz", (np.arange(n_train) % 10).astype(np.uint8), True)
    _write_idx(d / "t10k-images-idx3-ubyte", rs.randint(1, 256, (n_test, 28, 28)).astype(np.uint8), False)
    _write_idx(d / "t10k-labels-idx1-ubyte", (np.arange(n_test) % 10).astype(np.uint8), False)
    return d


def test_idx_dataset_from_cnnsplit_data(tmp_path, monkeypatch):
    _fake_mnist_dir(tmp_path)
    monkeypatch.setenv("CNNSPLIT_DATA", str(tmp_path))
    ds = load_dataset("mnist")
    assert ds.x_train.shape == (12, 32, 32, 1) and ds.x_test.shape == (6, 32, 32, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    # 28x28 padded with a 2-pixel zero border; the inside is the original image
    assert ds.x_train[:, :2].max() == 0 and ds.x_train[:, -2:].max() == 0
    assert ds.x_train[:, 2:30, 2:30].min() >= 1
    assert ds.info.num_classes == 10 and ds.info.channels == 1
    np.testing.assert_array_equal(ds.y_train, np.arange(12) % 10)


def test_idx_label_count_mismatch(tmp_path, monkeypatch):
    d = _fake_mnist_dir(tmp_path)
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8), True)
    monkeypatch.setenv("CNNSPLIT_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="12 images but .* 5 labels"):
        load_dataset("mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 32, 32, 1) and ds.x_test.shape == (10000, 32, 32, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.y_train[:4].tolist() == [9, 0, 0, 3]  # IDX file order
    x = normalize(ds.x_train[:2000], ds.info.mean, ds.info.std)
    assert abs(float(x.mean())) < 0.1 and 0.85 < float(x.std()) < 1.15


def test_digits_embedded(digits):
    assert digits.x_train.shape == (1438, 32, 32, 1) and digits.x_test.shape == (359, 32, 32, 1)
    assert sorted(set(digits.y_train.tolist())) == list(range(10))
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    x = normalize(digits.x_train, digits.info.mean, digits.info.std)
    assert abs(float(x.mean())) < 1e-2 and abs(float(x.std()) - 1) < 1e-2


def test_unknown_and_missing_dataset(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet77'.*available"):
        load_dataset("imagenet77")
    monkeypatch.setenv("CNNSPLIT_DATA", str(tmp_path))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DatasetError, match=r"dataset 'mnist' not found.*CNNSPLIT_DATA/mnist"):
        load_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match=r"dataset 'cifar10' not found.*tfds build cifar10"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_python_batches(tmp_path, monkeypatch):
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rs = np.random.RandomState(2)
    for i in range(1, 6):
        b = {"data": rs.randint(0, 256, (4, 3072)).astype(np.uint8), "labels": list(range(i, i + 4))}
        pickle.dump(b, open(root / f"data_batch_{i}", "wb"))
    test = {"data": rs.randint(0, 256, (3, 3072)).astype(np.uint8), "labels": [0, 1, 2]}
    pickle.dump(test, open(root / "test_batch", "wb"))
    monkeypatch.setenv("CNNSPLIT_DATA", str(tmp_path))
    ds = load_dataset("cifar10")
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    # CHW rows -> HWC: pixel (0, 0) of image 0 has channels data[0], data[1024], data[2048]
    d0 = test["data"][0]
    np.testing.assert_array_equal(ds.x_test[0, 0, 0], [d0[0], d0[1024], d0[2048]])
    assert ds.info.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name,channels", [("cifar10", 3), ("svhn_cropped", 3), ("fashion_mnist", 1)])
def test_tfds_path_under_mock_data(tmp_path, monkeypatch, name, channels):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("CNNSPLIT_DATA", str(tmp_path))  # no local files
    import cnnsplit_jax.data.sources as data

    monkeypatch.setattr(data, "DEBIAN_FASHION", tmp_path / "none")
    with tfds.testing.mock_data(num_examples=8):
        ds = load_dataset(name)
    assert ds.x_train.shape == (8, 32, 32, channels) and ds.x_test.shape == (8, 32, 32, channels)
    assert ds.info.source == "tfds" and ds.info.num_classes == 10
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10


def test_svhn_from_the_original_mat_files_in_file_order(tmp_path, monkeypatch):
    """The reference reads SVHN through torchvision (file order, label 10 -> 0); the .mat
    layout is X [32, 32, 3, N], y [N, 1]."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    d = tmp_path / "svhn_cropped"
    d.mkdir()
    files = {}
    for split, n in (("train", 7), ("test", 5)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10, 1, 2, 10, 9, 3, 4][:n])[:, None]
        savemat(d / f"{split}_32x32.mat", {"X": x, "y": y})
        files[split] = (x, y)
    monkeypatch.setenv("CNNSPLIT_DATA", str(tmp_path))
    ds = load_dataset("svhn_cropped")
    x, y = files["train"]
    assert ds.y_train.tolist() == [0, 1, 2, 0, 9, 3, 4] and ds.y_test.tolist() == [0, 1, 2, 0, 9]
    np.testing.assert_array_equal(ds.x_train[3], x[:, :, :, 3])  # image 3 is the file's image 3
    assert ds.x_train.shape == (7, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.info.source.endswith("file order") and ds.info.mean == (0.485, 0.456, 0.406)
    savemat(d / "test_32x32.mat", {"X": files["test"][0][:, :, :, :4], "y": files["test"][1]})
    with pytest.raises(DatasetError, match="expected \\[32, 32, 3, N\\] with N = 5"):
        load_dataset("svhn_cropped")


def test_svhn_through_tfds_warns_once_about_the_order(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    import warnings

    import cnnsplit_jax.data.sources as data
    from cnnsplit_jax.data import DatasetOrderWarning

    monkeypatch.setenv("CNNSPLIT_DATA", str(tmp_path))
    monkeypatch.setattr(data, "_WARNED_ORDER", set())
    with tfds.testing.mock_data(num_examples=4), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset("svhn_cropped")
        load_dataset("svhn_cropped")
    order = [w for w in caught if issubclass(w.category, DatasetOrderWarning)]
    assert len(order) == 1 and "shuffled" in str(order[0].message)


def test_estimator_recipes_per_dataset():
    """GradSplitter's dataset_loader: CIFAR-10 alpha 1 / min_size 100, SVHN alpha 0.5 / min 10."""
    from cnnsplit_jax.data import estimator_recipe
    from cnnsplit_jax.train import TrainConfig, dirichlet_settings

    assert tuple(estimator_recipe("svhn_cropped")) == (0.5, 10)
    assert tuple(estimator_recipe("svhn_cropped[0,1]")) == (0.5, 10)
    assert tuple(estimator_recipe("cifar10:0-4")) == (1.0, 100)
    assert tuple(estimator_recipe("fashion_mnist")) == (1.0, 100)
    assert dirichlet_settings(TrainConfig(dirichlet_alpha="auto"), "svhn_cropped") == (0.5, 10)
    assert dirichlet_settings(TrainConfig(dirichlet_alpha=0.3, dirichlet_min_size=5), "svhn_cropped") == (0.3, 5)
    assert dirichlet_settings(TrainConfig(), "svhn_cropped") == (None, 10)  # no subsample
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        TrainConfig(dirichlet_alpha="often")


def test_train_val_split():
    tr, va = train_val_split(100, seed=3)
    assert len(tr) == 80 and len(va) == 20
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    tr2, va2 = train_val_split(100, seed=3)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(tr, train_val_split(100, seed=4)[0])
    with pytest.raises(ValueError):
        train_val_split(10, 0, val_fraction=1.5)


def test_dirichlet_subsample():
    labels = np.repeat(np.arange(10), 500)
    idx = dirichlet_subsample(labels, seed=1, alpha=1.0, min_size=20)
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.min() >= 20
    assert counts.max() == 500  # p / max(p): the largest class keeps everything
    assert len(set(idx.tolist())) == len(idx)
    np.testing.assert_array_equal(idx, dirichlet_subsample(labels, seed=1, alpha=1.0, min_size=20))
    assert counts.std() > 50  # non-IID
    with pytest.raises(ValueError, match="min_size"):
        dirichlet_subsample(np.repeat(np.arange(3), 5), seed=0, alpha=0.5, min_size=6)


def test_batches():
    import jax

    got = list(batches(10, 4))
    assert [len(b) for b in got] == [4, 4, 2]
    shuffled = np.concatenate(list(batches(10, 4, key=jax.random.key(0))))
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))
    assert [len(b) for b in batches(10, 4, drop_last=True)] == [4, 4]


def test_task_specs_and_class_selection(digits):
    assert parse_task("digits:0-2,9+digits:5") == [("digits", [0, 1, 2, 9]), ("digits", [5])]
    sub = select_classes(digits, [7, 3])
    assert sub.info.class_names == ("7", "3")
    assert set(np.unique(sub.y_train)) == {0, 1}
    assert (sub.y_train == 0).sum() == (digits.y_train == 7).sum()
    with pytest.raises(ValueError, match="unknown class index"):
        select_classes(digits, [3, 11])


#: class counts and train / validation sizes of the subsample below (seed 3, alpha 1, min 100)
PINNED_DIRICHLET_COUNTS = [353, 277, 434, 458, 407, 136, 131, 500, 463, 407]
PINNED_DIRICHLET_SPLIT = (2852, 714)


def _reference_style_dirichlet(labels, n_classes, seed, min_size, alpha):
    """The reference's procedure, as it is written there: numpy's *global* legacy RNG seeded
    once, per class a shuffled Python list cut at int(p_c * n_c) until every class keeps
    min_size, then the concatenation shuffled."""
    np.random.seed(seed)
    while True:
        p = np.random.dirichlet(np.repeat(alpha, n_classes))
        p = p / np.max(p)
        per_class = []
        for c in range(n_classes):
            idx = np.where(np.asarray(labels) == c)[0].tolist()
            np.random.shuffle(idx)
            per_class.append(idx[: int(p[c] * len(idx))])
        if min(len(k) for k in per_class) >= min_size:
            break
    out = [i for k in per_class for i in k]
    np.random.shuffle(out)
    return out


def test_dirichlet_subsample_and_its_in_order_split_match_the_reference():
    from cnnsplit_jax.data import split_indices

    labels = np.random.RandomState(0).permutation(np.repeat(np.arange(10), 500))
    saved = np.random.get_state()
    try:
        ref = _reference_style_dirichlet(labels, 10, seed=3, min_size=100, alpha=1.0)
    finally:
        np.random.set_state(saved)
    tr, va = split_indices(labels, 3, 0.2, dirichlet_alpha=1.0, dirichlet_min_size=100)
    cut = int(0.8 * len(ref))
    np.testing.assert_array_equal(tr, ref[:cut])  # the first 80% of the subsample, in its order
    np.testing.assert_array_equal(va, ref[cut:])
    # pinned: the subsample's class counts and sizes for this seed
    assert np.bincount(labels[np.concatenate([tr, va])], minlength=10).tolist() == PINNED_DIRICHLET_COUNTS
    assert (len(tr), len(va)) == PINNED_DIRICHLET_SPLIT


def test_tfds_file_order_from_record_ids():
    from cnnsplit_jax.data.sources import file_order

    np.testing.assert_array_equal(file_order([b"test_00002", b"test_00000", b"test_00001"]), [1, 2, 0])
    assert file_order(["train_3", "train_x"]) is None  # not all numbered: order kept
    assert file_order(["a_1", "a_1"]) is None and file_order(["nounderscore"]) is None


def test_one_normalization_value_reads_every_shape_it_used_to_come_in():
    import jax

    from cnnsplit_jax.data import Normalization
    from cnnsplit_jax.splitters import SplitData

    x = np.asarray([[[[0, 51]], [[255, 102]]]], np.uint8)  # [1, 2, 1, 2]
    norm = Normalization.of({"mean": [0.5, 0.2], "std": [0.25, 0.5]})
    want = (x / 255.0 - np.asarray([0.5, 0.2])) / np.asarray([0.25, 0.5])  # by hand: (x / 255 - mean) / std
    np.testing.assert_allclose(norm(x), want, rtol=1e-6)
    assert norm(x)[0, 0, 0].tolist() == pytest.approx([-2.0, 0.0])
    assert Normalization.of(([0.5, 0.2], (0.25, 0.5))) == norm == Normalization.of(norm)
    info = load_dataset("digits").info
    assert Normalization.of(info) == info.normalization == Normalization(tuple(info.mean), tuple(info.std))
    d = SplitData(x, np.zeros(1, int), x, np.zeros(1, int), [0.5, 0.2], [0.25, 0.5])
    assert Normalization.of(d) == norm and norm.to_json() == {"mean": [0.5, 0.2], "std": [0.25, 0.5]}
    mean, std = norm  # unpacks as the (mean, std) pairs it replaces
    assert (mean, std) == ((0.5, 0.2), (0.25, 0.5)) and jax.tree.leaves(norm) == [0.5, 0.2, 0.25, 0.5]
    with pytest.raises(ValueError, match="one value per channel"):
        Normalization.of((0.5, 0.25))
    with pytest.raises(ValueError, match="2 finite values"):
        Normalization.of({"mean": [0.5, 0.2], "std": [0.25, 0.0]}).check(2)


def _their_holdout(n):
    """CNNSplitter's utils/dataset_loader.py, transcribed: a list shuffled under the global seed."""
    saved = np.random.get_state()
    try:
        idx = list(range(n))
        np.random.seed(1009)
        np.random.shuffle(idx)
        return idx[: int(0.8 * len(idx))], idx[int(0.8 * len(idx)):]
    finally:
        np.random.set_state(saved)


def test_cnnsplitter_split_scheme_is_the_references():
    from cnnsplit_jax.data import class_holdout, holdout_split, split_indices
    from cnnsplit_jax.train import TrainConfig

    for n in (10, 997, 73257):  # 73257: SVHN's training set, int(0.8 n) = 58605 (round: 58606)
        tr, va = holdout_split(n)
        their_tr, their_va = _their_holdout(n)
        assert tr.tolist() == their_tr and va.tolist() == their_va
    assert len(holdout_split(73257)[0]) == 58605
    labels = np.random.RandomState(1).randint(0, 3, 500)
    for c in range(3):  # their per-class loader: the class's images in file order, then the split
        own = np.flatnonzero(labels == c)
        assert class_holdout(labels, c).tolist() == own[_their_holdout(len(own))[1]].tolist()
    tr, va = split_indices(labels, 5, 0.2, scheme="cnnsplitter")  # the run's seed is not used
    assert tr.tolist() == _their_holdout(500)[0] and va.tolist() == _their_holdout(500)[1]
    with pytest.raises(ValueError, match="Dirichlet"):
        split_indices(labels, 5, 0.2, dirichlet_alpha=1.0, scheme="cnnsplitter")
    with pytest.raises(ValueError, match="split scheme"):
        split_indices(labels, 5, 0.2, scheme="other")
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        TrainConfig(split_scheme="cnnsplitter", dirichlet_alpha=1.0)


def test_train_images_keeps_the_first_of_the_seeded_training_part():
    from cnnsplit_jax.data import split_indices
    from cnnsplit_jax.train import TrainConfig

    labels = np.arange(100) % 10
    tr, va = split_indices(labels, 5)
    tr30, va30 = split_indices(labels, 5, train_images=30)
    np.testing.assert_array_equal(tr30, tr[:30])  # a prefix of the same permutation
    np.testing.assert_array_equal(va30, va)  # validation unchanged
    assert len(set(tr30) & set(va30)) == 0
    with pytest.raises(ValueError, match=r"train_images must lie in \[1, 80\]"):
        split_indices(labels, 5, train_images=81)
    with pytest.raises(ValueError, match="train_images"):
        TrainConfig(train_images=0)
