"""Validation at the boundary: degenerate numbers, repeated classes, float images and labels,
and a diverging loss are refused with a specific message, before any work is saved as if it
were good."""

import numpy as np
import pytest

import cnnsplit_jax as cs
from cnnsplit_jax.cli import main
from cnnsplit_jax.data import Dataset, make_task, parse_task, select_classes, to_uint8
from cnnsplit_jax.pipeline import parse_modules, split_run, train_run
from cnnsplit_jax.splitters import CNNSplitterConfig, ConcernConfig, GradSplitterConfig
from cnnsplit_jax.train import TrainConfig, TrainingDivergedError


@pytest.mark.parametrize("cls,kwargs,says", [
    (TrainConfig, {"epochs": 0}, "epochs must be an integer >= 1, got 0"),
    (TrainConfig, {"epochs": -2}, "epochs must be an integer >= 1, got -2"),
    (TrainConfig, {"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    (TrainConfig, {"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    (TrainConfig, {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    (TrainConfig, {"momentum": 1.5}, r"momentum must be a finite number in \[0, 1\], got 1.5"),
    (TrainConfig, {"lr_milestones": (0.5, 2.0)}, "every lr milestone"),
    (TrainConfig, {"val_fraction": 0.0}, r"val_fraction must be a finite number in \(0, 1\)"),
    (GradSplitterConfig, {"lr_modularity": float("nan")}, "lr_modularity must be a finite number > 0"),
    (GradSplitterConfig, {"batch_size": 0}, "batch_size must be an integer >= 1"),
    (GradSplitterConfig, {"alpha": -1.0}, "alpha must be a finite number >= 0"),
    (CNNSplitterConfig, {"mutation_percent": float("nan")}, "mutation_percent must be a finite number"),
    (CNNSplitterConfig, {"sensitive_ratios": (0.5, 1.5)}, "every one of sensitive_ratios"),
    (CNNSplitterConfig, {"population": 0}, "population must be an integer >= 1"),
    (ConcernConfig, {"batch_size": 0}, "batch_size must be an integer >= 1"),
    (ConcernConfig, {"delta": float("nan")}, "delta must be a finite number"),
])
def test_configs_refuse_degenerate_values(cls, kwargs, says):
    with pytest.raises(ValueError, match=says):
        cls(**kwargs)


def test_a_diverging_loss_stops_training_before_anything_is_saved(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e12, momentum=0.0, lr_milestones=(), seed=0)
    with pytest.raises(TrainingDivergedError, match="the training loss became (nan|inf) in epoch 0"):
        train_run(tmp_path / "run", "simcnn", "digits", cfg, width=0.0625)
    assert not (tmp_path / "run" / "model.json").exists() and not (tmp_path / "run" / "train_state").exists()


def test_a_train_subset_must_be_positive(digits_run, tmp_path):
    for n in (-5, 0):
        with pytest.raises(ValueError, match=f"train_subset .* must be an integer >= 1 \\(or None\\), got {n}"):
            split_run(digits_run, tmp_path / "m", "grad", GradSplitterConfig(), train_subset=n)
    assert not (tmp_path / "m").exists()


def test_repeated_classes_are_refused(digits, digits_modules, tmp_path, capsys):
    for spec, says in (("digits:3,3", r"class\(es\) \[3\] named more than once"),
                       ("digits:0,1+digits:1,2", r"class\(es\) \['digits:1'\] named more than once"),
                       ("digits+digits:3", "takes every class of 'digits' and names it again"),
                       ("digits:3-1", "bad class range '3-1'"),
                       ("digits:", "no classes after 'digits:'")):
        with pytest.raises(ValueError, match=says):
            parse_task(spec)
    with pytest.raises(ValueError, match="named more than once"):
        make_task([(digits, [0, 1]), (digits, [1, 2])])
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        select_classes(digits, [3, 3])
    with pytest.raises(ValueError, match="named more than once"):
        parse_modules(f"{digits_modules}:3,3")
    ms = cs.load_module_set(digits_modules)
    with pytest.raises(ValueError, match="picks 0 and 1 are the same module"):
        cs.compose([cs.Pick(ms, 3), cs.Pick(ms, 3)])
    assert main(["compose", "--modules", f"{digits_modules}:3,3", "--out", str(tmp_path / "c")]) == 2
    assert main(["train", "--model", "simcnn", "--dataset", "digits:3,3", "--out", str(tmp_path / "t")]) == 2
    assert main(["compose", "--modules", f"{digits_modules}:3-1", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("named more than once") == 2 and "bad class range '3-1'" in err and "unknown dataset" not in err


def test_float_images_and_labels_are_refused_not_guessed(digits, digits_modules):
    x01 = digits.x_test[:32].astype(np.float32) / 255.0
    with pytest.raises(ValueError, match=r"must be uint8 pixels in \[0, 255\], got dtype float32; convert float "
                                         r"images with cnnsplit_jax.data.to_uint8"):
        Dataset(x01, digits.y_test[:32], x01, digits.y_test[:32], digits.info)
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype float64"):
        Dataset(digits.x_test[:32], digits.y_test[:32].astype(float), digits.x_test[:32], digits.y_test[:32],
                digits.info)
    with pytest.raises(ValueError, match="must be uint8"):
        cs.normalize(x01, digits.info.mean, digits.info.std)
    comp = cs.compose([cs.Pick(cs.load_module_set(digits_modules), c) for c in range(3)])
    with pytest.raises(ValueError, match="must be uint8"):
        cs.apply(comp, x01)
    # a float image declared as such: converted exactly, with its range checked
    back = to_uint8(x01, scale=1.0)
    np.testing.assert_array_equal(back, digits.x_test[:32])
    np.testing.assert_array_equal(cs.predict_scores(comp, back), cs.predict_scores(comp, digits.x_test[:32]))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        to_uint8(x01 * 255.0, scale=1.0)
    with pytest.raises(ValueError, match="1 NaN or infinite pixels"):
        to_uint8(np.where(np.arange(x01.size).reshape(x01.shape) == 5, np.nan, x01))
    data = cs.SplitData(digits.x_train[:64], digits.y_train[:64].astype(np.float32), digits.x_train[:64],
                        digits.y_train[:64], digits.info.mean, digits.info.std)
    model = cs.build_model("simcnn", num_classes=10, in_channels=1, width=0.0625)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        cs.gradsplitter.split(None, model, data, GradSplitterConfig(head_epochs=1, modularity_epochs=0))
    with pytest.raises(ValueError, match="x_val must be uint8"):
        cs.gradsplitter.split(None, model, data._replace(y_train=digits.y_train[:64], x_val=x01),
                              GradSplitterConfig(head_epochs=1, modularity_epochs=0))
