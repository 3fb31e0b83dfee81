"""The ``cnnsplit`` command end to end (the only tests that go through ``main([...])``):
each subcommand on real runs, its errors and warnings, and the flag defaults."""

import json
import shutil

import numpy as np
import pytest

from cnnsplit_jax.cli import main
from cnnsplit_jax.cli.parser import CONFIG_FLAGS, build_parser
from cnnsplit_jax.compose import Pick, compose, predict_scores
from cnnsplit_jax.data import make_task
from cnnsplit_jax.modules.module_set import load_module_set

from conftest import needs_fashion


def test_cli_train_and_info(tmp_path, capsys):
    from cnnsplit_jax.checkpoint import load_model

    out = tmp_path / "run"
    args = ["train", "--model", "rescnn", "--dataset", "digits", "--width", "0.0625",
            "--epochs", "1", "--batch-size", "128", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "train.json").read_text())
    for k in ("model", "dataset", "width", "num_classes", "num_kernels", "num_params",
              "test_accuracy", "train_seconds"):
        assert k in res
    assert res["model"] == "rescnn" and res["num_classes"] == 10 and res["num_kernels"] == 268
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["train_seconds"] > 0
    assert res["config"]["epochs"] == 1 and res["config"]["lr"] == 0.01 and res["config"]["recipe"] == "reference"
    model, meta = load_model(out)
    assert meta["normalization"]["mean"] == res["normalization"]["mean"]
    # 1 epoch of the 200-epoch reference schedule: warned
    assert "far too short" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rescnn" in text and "268" in text and "conv_1[8]x2" in text
    # a second run into the same directory without --resume is refused
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert main(["train", "--model", "simcnn", "--dataset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    shutil.rmtree(out)


def test_cli_refuses_to_mix_artefacts_and_explains_damaged_checkpoints(digits_modules, tmp_path, capsys):
    mods = tmp_path / "mods"
    shutil.copytree(digits_modules, mods)
    train = ["train", "--model", "simcnn_weak", "--recipe", "quick", "--dataset", "digits", "--width", "0.125",
             "--epochs", "1", "--out", str(mods)]
    assert main(train) == 2  # a trained model would be written into a module set
    assert "already holds a module set" in capsys.readouterr().err
    assert (mods / "modules.json").exists()
    assert main(["split", "--model-dir", str(mods), "--out", str(tmp_path / "s")]) == 2  # not a model run
    capsys.readouterr()
    # --resume never continues another kind of run; --overwrite replaces it
    assert main(train + ["--resume"]) == 2 and "cannot resume" in capsys.readouterr().err
    assert main(train + ["--overwrite"]) == 0
    assert (mods / "model.json").exists() and not (mods / "modules.json").exists()
    assert not (mods / "split.json").exists()
    capsys.readouterr()
    # a damaged checkpoint: one or two lines that name it; the full cause with --verbose
    (mods / "model" / "state" / "_METADATA").write_text("{ not json")
    assert main(["info", str(mods)]) == 2
    err = capsys.readouterr().err
    assert "corrupt checkpoint" in err and str(mods / "model") in err and len(err.strip().splitlines()) <= 3
    assert main(["--verbose", "info", str(mods)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) > 3


def test_cli_split_and_evaluate_on_digits(digits_run, tmp_path, capsys):
    out = tmp_path / "mods"
    # the reference's lr on a short run cannot remove a kernel: warned before the search;
    # a modularity schedule that is not whole cycles is rounded up, with a warning
    assert main(["split", "--method", "grad", "--model-dir", str(digits_run), "--out", str(out),
                 "--head-epochs", "1", "--modularity-epochs", "3", "--train-subset", "320"]) == 0
    err = capsys.readouterr().err
    assert "running 7" in err and "no kernel can be removed" in err
    res = json.loads((out / "split.json").read_text())
    assert res["method"] == "grad" and res["epochs"] == 8 and res["train_images"] == 320
    for png in ("retention_heatmap.png", "module_f1.png", "accuracy_vs_kernels.png"):
        assert (out / png).stat().st_size > 1000
    # re-evaluation of the saved set reproduces the numbers
    assert main(["evaluate", str(out)]) == 0
    assert "composed accuracy" in capsys.readouterr().out
    ev = json.loads((out / "evaluate.json").read_text())
    assert ev["composed_accuracy"] == res["composed_accuracy"]
    assert ev["module_f1"] == res["module_f1"]  # a module that predicts nothing has no F1 (None) in both
    # an existing search is not overwritten silently; --resume of a finished search is a no-op
    assert main(["split", "--model-dir", str(digits_run), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # the quick preset: the demo's short schedule
    args = build_parser().parse_args(["split", "--model-dir", "m", "--out", "o", "--recipe", "quick"])
    from cnnsplit_jax.cli.commands import _split_config

    cfg = _split_config(args)
    assert (cfg.head_epochs, cfg.modularity_epochs, cfg.lr_modularity, cfg.alpha) == (2, 28, 0.02, 0.1)


def test_cli_concern_split_refusals_and_evaluate(resnet_digits, concern_modules, tmp_path, capsys):
    assert main(["split", "--method", "grad", "--model-dir", str(resnet_digits), "--out", str(tmp_path / "g")]) == 2
    assert "a ResNet (position nodes): split it with --method concern" in capsys.readouterr().err
    mods = tmp_path / "none"
    shutil.copytree(concern_modules["none"], mods)
    assert main(["split", "--method", "concern", "--model-dir", str(resnet_digits), "--out", str(mods)]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["evaluate", str(mods)]) == 0
    ev = json.loads((mods / "evaluate.json").read_text())
    split = json.loads((mods / "split.json").read_text())
    assert ev["composed_accuracy"] == pytest.approx(split["composed_accuracy"])
    assert "decomposition cost" in capsys.readouterr().out


def test_every_config_flag_has_its_default_once_and_help_shows_it():
    import dataclasses

    parser = build_parser()
    assert CONFIG_FLAGS  # flags declared from the config dataclasses
    for sub in ("train", "split", "demo", "subtask"):
        sp = parser._subparsers._group_actions[0].choices[sub]
        help_text = " ".join(sp.format_help().split())
        declared = [a for a in sp._actions if hasattr(a, "config_field")]
        assert len(declared) == {"train": 19, "split": 33, "demo": 2, "subtask": 5}[sub]
        for action in declared:
            assert action.default is None, action.dest  # "not given": the config's default applies
            cls, field = action.config_field
            default = {f.name: f for f in dataclasses.fields(cls)}[field].default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert f"default {shown or 'none'}" in " ".join(action.help.split()), (sub, action.dest)
        assert "default" in help_text


def test_cli_split_ga_writes_a_module_set_that_evaluates_and_composes(digits_run, tmp_path):
    out = tmp_path / "ga"
    rc = main(["split", "--method", "ga", "--model-dir", str(digits_run), "--out", str(out),
               "--population", "12", "--generations", "3", "--groups", "4", "--eval-images", "160",
               "--sensitive", "", "--other-ratios", "0.75,1.0"])
    assert rc == 0
    res = json.loads((out / "split.json").read_text())
    assert res["method"] == "ga" and res["generations"] == 4 and len(res["best_fitness"]) == 4
    assert 0 <= res["best_generation"] <= 3
    assert res["composed_accuracy"] > 0.5 and res["mean_kernel_retention"] < 1.0
    assert (out / "fitness.png").stat().st_size > 1000
    ms = load_module_set(out)
    assert ms.heads is None and ms.meta["method"] == "ga"
    assert main(["evaluate", str(out)]) == 0
    ev = json.loads((out / "evaluate.json").read_text())
    assert ev["composed_accuracy"] == pytest.approx(res["composed_accuracy"])
    assert main(["compose", "--modules", str(out), "--out", str(tmp_path / "comp")]) == 0
    comp = json.loads((tmp_path / "comp" / "compose.json").read_text())
    assert comp["accuracy"] == pytest.approx(res["composed_accuracy"])
    # an existing search is not overwritten without --resume
    assert main(["split", "--method", "ga", "--model-dir", str(digits_run), "--out", str(out)]) == 2


def test_compose_cli_picks_best_f1_across_models_and_architectures(digits_modules, rescnn_modules, tmp_path, digits):
    out = tmp_path / "comp"
    assert main(["compose", "--modules", str(digits_modules), "--modules", str(rescnn_modules),
                 "--out", str(out)]) == 0
    res = json.loads((out / "compose.json").read_text())
    assert len(res["f1"]) == len(res["precision"]) == len(res["recall"]) == 10
    assert (out / "confusion.png").stat().st_size > 1000
    cf1 = res["candidate_f1"]
    for c, ch in enumerate(res["chosen"]):  # per class, the module with the best F1 wins
        best = max(cf1, key=lambda src: (cf1[src][str(c)], src == str(digits_modules)))
        assert cf1[ch["source"]][str(c)] == cf1[best][str(c)]
    # the accurate-model scenario: at least as good as the weaker source model, close to the best
    bases = [s["base_accuracy"] for s in res["sources"]]
    assert res["accuracy"] >= min(bases) and res["accuracy"] >= max(bases) - 0.05
    # the JSON numbers are those of the composition of the chosen modules
    sets = {str(digits_modules): load_module_set(digits_modules), str(rescnn_modules): load_module_set(rescnn_modules)}
    picks = [Pick(sets[ch["source"]], ch["module"]) for ch in res["chosen"]]
    task = make_task([(digits, list(range(10)))])
    pred = predict_scores(compose(picks), task.ds.x_test).argmax(-1)
    assert res["accuracy"] == pytest.approx(float((pred == task.ds.y_test).mean()))
    # a subset of classes given in another order: labels are the sorted covered classes
    assert main(["compose", "--modules", f"{digits_modules}:7,3", "--modules", f"{digits_modules}:1",
                 "--out", str(out / "sub")]) == 0
    sub = json.loads((out / "sub" / "compose.json").read_text())
    assert sub["class_names"] == ["1", "3", "7"] and sub["images"] == int(np.isin(task.ds.y_test, [1, 3, 7]).sum())
    assert sub["accuracy"] > 0.9
    # unknown class index and class-count mismatch are clear CLI errors
    assert main(["compose", "--modules", f"{digits_modules}:12", "--out", str(out / "x")]) == 2
    assert main(["compose", "--modules", str(digits_modules), "--dataset", "cifar10", "--out", str(out / "y")]) == 2


def test_patch_improves_weak_models_target_class(digits_modules, tmp_path):
    weak = tmp_path / "weak"
    # a deliberately weak model: CNNSplitter's weak SimCNN, narrow, trained for 2 epochs on a
    # task whose last class (the target) is digit 3
    assert main(["train", "--model", "simcnn_weak", "--recipe", "weak", "--dataset", "digits:0-2,4-9,3",
                 "--width", "0.125", "--epochs", "2", "--batch-size", "64", "--out", str(weak)]) == 0
    out = tmp_path / "patch"
    assert main(["patch", "--weak", str(weak), "--modules", str(digits_modules), "--target-class", "3",
                 "--out", str(out)]) == 0
    res = json.loads((out / "patch.json").read_text())
    for part in ("before", "after"):
        assert set(res[part]) >= {"precision", "recall", "f1", "accuracy"}
    # measured: target-class F1 0.40 -> 0.91 with the demo's modules
    assert res["after"]["f1"] >= res["before"]["f1"] + 0.2
    assert res["after"]["accuracy"] >= res["before"]["accuracy"] - 0.05
    assert (out / "confusion_before.png").stat().st_size > 1000
    # the module must recognise the weak model's target class
    assert main(["patch", "--weak", str(weak), "--modules", str(digits_modules), "--target-class", "4",
                 "--out", str(tmp_path / "bad")]) == 2


def test_replace_swaps_one_module(digits_modules, rescnn_modules, tmp_path, digits):
    out = tmp_path / "rep"
    assert main(["replace", "--modules", str(digits_modules), "--with", str(rescnn_modules),
                 "--class", "3", "--out", str(out)]) == 0
    res = json.loads((out / "replace.json").read_text())
    assert res["old_source"] == str(digits_modules) and res["new_source"] == str(rescnn_modules)
    # "before" is the module set's own composition; "after" is exactly the composition with
    # class 3's column taken from the other model (checked column by column in test_reuse.py)
    assert res["before"]["accuracy"] == pytest.approx(
        json.loads((digits_modules / "split.json").read_text())["composed_accuracy"], abs=1e-9)
    a, b = load_module_set(digits_modules), load_module_set(rescnn_modules)
    task = make_task([(digits, list(range(10)))])
    picks = [Pick(a, c) for c in range(10)]
    picks[3] = Pick(b, 3)
    pred = predict_scores(compose(picks), task.ds.x_test).argmax(-1)
    assert res["after"]["accuracy"] == pytest.approx(float((pred == task.ds.y_test).mean()))
    assert (out / "confusion_after.png").stat().st_size > 1000


@needs_fashion
def test_new_task_from_fashion_and_digits_modules(digits_modules, tmp_path, capsys):
    f = tmp_path / "fashion"
    assert main(["train", "--model", "simcnn", "--dataset", "fashion_mnist:0,1,7", "--width", "0.125",
                 "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--out", str(f / "run")]) == 0
    # one head epoch and no modularization (what "--modularity-epochs 2" silently ran before it
    # was rounded up to whole cycles): the modules are the whole model with trained heads
    assert main(["split", "--model-dir", str(f / "run"), "--out", str(f / "mods"), "--head-epochs", "1",
                 "--modularity-epochs", "0", "--train-subset", "2000"]) == 0
    assert "no modularization epoch" in capsys.readouterr().err
    assert json.loads((f / "mods" / "split.json").read_text())["epochs"] == 1
    out = tmp_path / "new"
    assert main(["compose", "--modules", f"{f / 'mods'}:0,2", "--modules", f"{digits_modules}:3,4",
                 "--baseline-epochs", "1", "--out", str(out)]) == 0
    res = json.loads((out / "compose.json").read_text())
    assert res["task"] == "fashion_mnist:0,7+digits:3,4"
    assert res["class_names"] == ["t-shirt/top", "sneaker", "3", "4"]
    assert res["chosen"][1]["module"] == 2 and res["chosen"][1]["dataset_class"] == 7
    # measured: composed 0.822 (AMD EPYC), from scratch 0.962; chance is 0.25. The composition is
    # asserted well above chance, not near a figure one CPU measured
    assert res["accuracy"] > 0.6 and res["baseline"]["accuracy"] > 0.8
    assert res["baseline"]["train_seconds"] > 0 and "training_seconds_saved" in res


def test_optional_config_flags_take_none():
    from cnnsplit_jax.cli.parser import config_from
    from cnnsplit_jax.splitters import ConcernConfig

    base = ["split", "--method", "concern", "--model-dir", "m", "--out", "o"]
    fields = ("concerned_per_class", "min_confidence")
    args = build_parser().parse_args(base + ["--min-confidence", "none", "--concerned-per-class", "500"])
    cfg = config_from(ConcernConfig, args, fields)
    assert cfg.min_confidence is None and cfg.concerned_per_class == 500
    cfg = config_from(ConcernConfig, build_parser().parse_args(base), fields)
    assert cfg.min_confidence == 0.9 and cfg.concerned_per_class == 1000  # the lab's defaults
    cfg = config_from(ConcernConfig, build_parser().parse_args(base + ["--concerned-per-class", "None"]), fields)
    assert cfg.concerned_per_class is None


def test_ga_recipe_auto_finds_the_family_preset_and_warns_on_a_model_it_was_not_tuned_for(tmp_path):
    import warnings

    from cnnsplit_jax.cli.commands import _split_config
    from cnnsplit_jax.progress import RunWarning
    from cnnsplit_jax.splitters.cnnsplitter import PRESETS, resolve_preset

    def preset(arch, dataset, recipe=None):
        d = tmp_path / f"{arch}-{dataset}"
        d.mkdir()
        (d / "model.json").write_text(json.dumps({"arch": arch, "dataset": dataset}))
        args = build_parser().parse_args(["split", "--method", "ga", "--model-dir", str(d), "--out", "o"]
                                         + (["--recipe", recipe] if recipe else []))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cfg = _split_config(args)
        said = [str(x.message) for x in w if issubclass(x.category, RunWarning)]
        name, got, lib_said, _ = resolve_preset(arch, dataset, recipe)  # the library's answer, the same
        assert lib_said == said and (name is None) == (got == {})
        assert all(getattr(cfg, k) == v for k, v in got.items() if k not in ("num_parents", "keep_parents")), name
        return got, said

    got, said = preset("rescnn_cnnsplitter", "svhn_cropped")  # the reference's own model: its preset, no word
    assert got == PRESETS["rescnn_svhn"] and said == []
    args = build_parser().parse_args(["split", "--method", "ga", "--model-dir", str(tmp_path / "rescnn_cnnsplitter-"
                                      "svhn_cropped"), "--out", "o", "--population", "8"])
    cfg = _split_config(args)  # the preset is recorded in the config (split.json's "config")
    assert cfg.preset == "rescnn_svhn" and cfg.population == 8 and cfg.mutation_percent == 10.0
    got, said = preset("simcnn", "svhn_cropped")  # GradSplitter's BN variant: the same preset, one warning
    assert got == PRESETS["simcnn_svhn"] and got["mutation_percent"] == 10.0 and got["gamma"] == 0.95
    assert len(said) == 1 and "tuned its simcnn_svhn configuration on simcnn_cnnsplitter" in said[0]
    got, said = preset("incecnn", "cifar10", recipe="rescnn_cifar10")  # an explicit preset on another model
    assert got == PRESETS["rescnn_cifar10"] and len(said) == 1
    assert preset("simcnn", "digits") == ({}, [])  # no preset for the data set: the defaults, no word


def test_the_method_registry_is_what_the_cli_and_pipeline_read():
    from cnnsplit_jax.splitters import METHODS, CNNSplitterConfig, ConcernConfig, method, methods_for

    parser = build_parser()
    split = next(a for a in parser._subparsers._group_actions[0].choices["split"]._actions if a.dest == "method")
    assert sorted(split.choices) == sorted(METHODS) == ["concern", "ga", "grad", "mwt"]
    for m in METHODS.values():  # every flag the record names exists and sets a field of its config
        assert set(m.cli_fields) <= {f.name for f in __import__("dataclasses").fields(m.config)}, m.name
        args = parser.parse_args(["split", "--method", m.name, "--model-dir", "m", "--out", "o"])
        assert all(hasattr(args, f) for f in m.cli_fields)
        assert callable(m.package.split) and callable(m.package.report) and callable(m.package.summary_line)
    assert [x.name for x in methods_for("node")] == ["concern"]
    assert [x.name for x in methods_for("kernel")] == ["grad", "ga", "mwt"]
    assert (METHODS["grad"].progress, METHODS["ga"].progress, METHODS["concern"].progress,
            METHODS["mwt"].progress) == ("search", "ga", None, None)
    # the methods that train their own model: the train command's --method choices
    from cnnsplit_jax.splitters.registry import trainers

    assert [m.name for m in trainers()] == ["mwt"] and METHODS["grad"].training is None
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "method")
    assert train.choices == ["standard", "mwt"] and train.default == "standard"
    assert {m.training.key for m in trainers()} == {"mwt"} and METHODS["mwt"].training.recipe == "mwt"
    with pytest.raises(ValueError, match="unknown method 'nonesuch'; expected one of"):
        method("nonesuch")
    with pytest.raises(ValueError, match="--recipe applies to --method grad and ga"):
        METHODS["concern"].make_config({}, "quick")
    cfg, warns, notes = METHODS["ga"].make_config({"population": 8}, "narrow")
    assert isinstance(cfg, CNNSplitterConfig) and (cfg.population, cfg.num_parents, cfg.keep_parents) == (8, 8, 8)
    assert cfg.generations == 30 and warns == [] and notes == []
    cfg, warns, _ = METHODS["grad"].make_config({"modularity_epochs": 10}, "quick")
    assert cfg.modularity_epochs == 14 and "running 14" in warns[0]
    assert METHODS["concern"].make_config({"delta": 0.5})[0] == ConcernConfig(delta=0.5)
