"""MwT's training loop, modularization and sub-task reuse: the optimiser against PyTorch's
SGD / CosineAnnealingLR, resume, the generators on disk, the module masks against the
frequency rule computed here from the recorded masks, and the sub-task module."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnsplit_jax import checkpoint as ckpt
from cnnsplit_jax.data import Dataset
from cnnsplit_jax.models import build_model
from cnnsplit_jax.modules import load_module_set
from cnnsplit_jax.pipeline import split_run, train_run
from cnnsplit_jax.splitters import GradSplitterConfig
from cnnsplit_jax.splitters.mwt import MwTConfig, MwTObjective, MwTSplitConfig, load_generators, record_masks
from cnnsplit_jax.splitters.mwt.reuse import fine_tune_subtask, restricted_accuracy, subtask_masks
from cnnsplit_jax.train import RECIPES, TrainConfig, fit, make_optimizer, objective_accuracy


def test_nesterov_sgd_with_cosine_annealing_equals_pytorch():
    torch = pytest.importorskip("torch")
    steps_per_epoch, epochs = 3, 4
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(steps_per_epoch * epochs, 5)).astype(np.float32)
    for period, wd in ((1.0, 0.0), (2.0, 1e-3)):
        cfg = TrainConfig(**{**RECIPES["mwt-quick"], "epochs": epochs, "cosine_period": period, "weight_decay": wd})
        tx = make_optimizer(cfg, steps_per_epoch)
        p = jnp.asarray(rng.normal(size=5).astype(np.float32))
        tp = torch.nn.Parameter(torch.from_numpy(np.asarray(p).copy()))
        opt = torch.optim.SGD([tp], lr=0.05, momentum=0.9, nesterov=True, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(epochs * period))
        state = tx.init(p)
        for i, g in enumerate(grads):
            upd, state = tx.update(jnp.asarray(g), state, p)
            p = p + upd
            tp.grad = torch.from_numpy(g.copy())
            opt.step()
            if (i + 1) % steps_per_epoch == 0:
                sched.step()
        np.testing.assert_allclose(np.asarray(p), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def _tiny(key=0):
    return build_model("simcnn", num_classes=10, in_channels=1, width=0.125, fc_hidden=32, key=key)


class Stop(Exception):
    pass


def test_mwt_fit_trains_generators_and_resumes_bit_identically(digits, tmp_path):
    ds = Dataset(digits.x_train[:384], digits.y_train[:384], digits.x_test[:64], digits.y_test[:64], digits.info)
    cfg = TrainConfig(**{**RECIPES["mwt-quick"], "epochs": 2, "batch_size": 64, "seed": 3})
    obj = MwTObjective()
    full = fit(_tiny(), ds, cfg, objective=obj)
    assert set(full.extra) == {f"conv_{i}" for i in range(1, 13)}  # conv_0 reads the image: no generator
    fresh = obj.init(jax.random.fold_in(jax.random.key(3), 0x6F626A), _tiny())
    assert not np.allclose(full.extra["conv_5"]["w1"], fresh["conv_5"]["w1"])  # the generators were trained
    h = full.history[0]
    assert {"train_ce", "train_cohesion", "train_coupling", "train_kernel_rate"} <= set(h)
    assert h["train_loss"] == pytest.approx(h["train_ce"] + 0.5 * h["train_cohesion"] + 1.5 * h["train_coupling"],
                                            rel=1e-4)  # per-batch means of a linear combination

    def crash(p):
        if p.stage == "epoch" and p.index == 0:
            raise Stop

    with pytest.raises(Stop):
        fit(_tiny(), ds, cfg, run_dir=tmp_path, callbacks=crash, objective=obj)
    resumed = fit(_tiny(), ds, cfg, run_dir=tmp_path, resume=True, objective=obj)
    for a, b in zip(jax.tree.leaves((nnx.state(resumed.model), resumed.extra)),
                    jax.tree.leaves((nnx.state(full.model), full.extra))):
        np.testing.assert_array_equal(a, b)
    assert resumed.history == [{**r, "seconds": resumed.history[i]["seconds"]} for i, r in enumerate(full.history)]
    with pytest.raises(ckpt.CheckpointError, match="cannot resume"):  # a plain run cannot continue it
        fit(_tiny(), ds, cfg, run_dir=tmp_path, resume=True)
    with pytest.raises(ckpt.CheckpointError, match="beta=2"):  # nor one with other loss weights
        fit(_tiny(), ds, cfg, run_dir=tmp_path, resume=True, objective=MwTObjective(MwTConfig(beta=2.0)))


@pytest.fixture(scope="module")
def mwt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mwt") / "run"
    cfg = TrainConfig(**{**RECIPES["mwt-quick"], "epochs": 3, "batch_size": 64, "seed": 0})
    res = train_run(out, "simcnn", "digits", cfg, width=0.125, fc_hidden=32, recipe="mwt-quick", method="mwt",
                    method_config=MwTConfig(alpha=0.5, beta=1.5))
    return out, res


def test_mwt_run_saves_its_generators_and_is_split_by_mwt_only(mwt_run, digits_run, tmp_path):
    out, res = mwt_run
    model, meta = ckpt.load_model(out)
    gens = load_generators(out, model, meta)
    assert meta["mwt"]["alpha"] == 0.5 and meta["mwt"]["layers"]["conv_1"] == [8, 8]
    assert res["method"] == "mwt" and 0 <= res["test_accuracy_model_alone"] <= 1
    assert res["model_alone"] == "without its generators"
    from cnnsplit_jax.data import load_dataset

    ds = load_dataset("digits")
    acc = objective_accuracy(MwTObjective(), model, gens, ds.x_test, ds.y_test, ds.info)
    assert acc == res["test_accuracy"] == meta["test_accuracy"]  # test accuracy = with its generators
    # another method would decompose the model without its generators: refused
    with pytest.raises(ValueError, match="trained for MwT.*--method mwt"):
        split_run(out, tmp_path / "g", "grad", GradSplitterConfig())
    # a plain run has no generators to split with
    with pytest.raises(ckpt.CheckpointError, match="no MwT-trained model"):
        split_run(digits_run, tmp_path / "m", "mwt", MwTSplitConfig())
    # damaged generators are refused, not used (64 bytes flipped in the middle of the array data)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    victim = max((p for p in (damaged / "generators").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    b = bytearray(victim.read_bytes())
    for i in range(64):
        b[len(b) // 2 + i] ^= 0xFF
    victim.write_bytes(bytes(b))
    with pytest.raises(ckpt.CheckpointError):
        load_generators(damaged, model, meta)
    wrong = {**meta, "mwt": {**meta["mwt"], "layers": {**meta["mwt"]["layers"], "conv_1": [8, 9]}}}
    with pytest.raises(ckpt.CheckpointError, match="saved generators are for the layers"):
        load_generators(out, model, wrong)


def _rule(freq, threshold=0.9, step=0.05):
    """The frequency rule of spec mwt.md, written out: lower a layer's threshold until it keeps one."""
    t = threshold
    while not (freq >= t - 1e-6).any():
        t -= step
    return freq >= t - 1e-6


def test_mwt_split_masks_follow_the_frequency_rule(mwt_run, tmp_path):
    out, _ = mwt_run
    res = split_run(out, tmp_path / "mods", "mwt", MwTSplitConfig())
    ms = load_module_set(tmp_path / "mods")
    model, meta = ckpt.load_model(out)
    gens = load_generators(out, model, meta)
    assert ms.meta["method"] == "mwt" and ms.heads is None
    np.testing.assert_array_equal(ms.masks["conv_0"], 1.0)  # no generator: every kernel kept
    from cnnsplit_jax.pipeline.runs import run_data

    rd = run_data(meta)
    x, y = rd.ds.x_train[rd.train_idx], rd.ds.y_train[rd.train_idx]
    layers, binary, logits = record_masks(model, gens, x, rd.ds.info.normalization)
    assert layers == [f"conv_{i}" for i in range(1, 13)]  # SimCNN: one layer per mask point
    for p, b in zip(layers, binary):
        for c in range(10):
            want = _rule(b[y == c].mean(0))
            np.testing.assert_array_equal(ms.masks[p][c] > 0, want, err_msg=f"{p} class {c}")
    m = res["mwt"]
    kept = np.concatenate([ms.masks[p] for p in layers], axis=1)
    assert m["kernel_retention"] == pytest.approx(kept.mean())
    assert m["train_accuracy_with_generators"] == pytest.approx(float((logits.argmax(-1) == y).mean()))
    assert 0 <= m["coupling"] <= 1 and 0 <= m["cohesion"] <= 1
    assert res["composed_accuracy"] >= 0 and "val_accuracy_without_generators" in m


def test_subtask_module_is_the_union_fine_tuned_with_a_new_head(mwt_run, tmp_path, digits):
    out, _ = mwt_run
    split_run(out, tmp_path / "mods", "mwt", MwTSplitConfig())
    ms = load_module_set(tmp_path / "mods")
    union = subtask_masks(ms, [2, 7])
    for p, m in union.items():
        np.testing.assert_array_equal(m > 0, (ms.masks[p][2] > 0) | (ms.masks[p][7] > 0))
    cfg = TrainConfig(**{**RECIPES["mwt-quick"], "epochs": 1, "batch_size": 32, "cosine_period": 2.0})
    r = fine_tune_subtask(ms, digits, [2, 7], cfg)
    assert r.fit.extra["w"].shape == (10, 2) and r.fit.extra["b"].shape == (2,)
    for s in r.fit.model.topology:  # the extracted module keeps the union's kernels
        assert s.out_channels == max(1, int(union[s.mask].sum()))
    layers = ms.base.topology  # kept kernels per conv layer of the base model / all its kernels
    assert r.kernel_retention == pytest.approx(sum(float(union[s.mask].sum()) for s in layers)
                                               / sum(s.out_channels for s in layers))
    sel = np.isin(digits.y_test, [2, 7])
    x, y = digits.x_test[sel], (digits.y_test[sel] == 7).astype(int)
    from cnnsplit_jax.train import predict

    by_hand = np.maximum(np.asarray(predict(r.fit.model, x, digits.info)), 0) @ np.asarray(r.fit.extra["w"]) \
        + np.asarray(r.fit.extra["b"])
    assert r.test_accuracy == pytest.approx(float((by_hand.argmax(-1) == y).mean()))
    std = restricted_accuracy(ms.base, digits, [2, 7])
    logits = np.asarray(predict(ms.base, x, digits.info))[:, [2, 7]]
    assert std == pytest.approx(float((logits.argmax(-1) == y).mean()))
    with pytest.raises(ValueError, match="at least 2 distinct"):
        subtask_masks(ms, [3, 3])


def test_rescnn_gets_a_generator_per_conv_and_a_tied_pair_keeps_the_union(digits):
    """ResCNN as the reference's MwT ResCNN: every conv but the first has its own generator
    (conv_3 too, though it shares conv_1's mask point); the tied point's module mask is the
    union of its layers' masks, each computed by the frequency rule (written out here)."""
    from cnnsplit_jax.splitters import SplitData
    from cnnsplit_jax.splitters.mwt import init_generators, split

    model = build_model("rescnn", num_classes=10, in_channels=1, width=0.0625, key=1)
    gens = init_generators(jax.random.key(2), model)
    assert list(gens) == [f"conv_{i}" for i in range(1, 12)]
    assert gens["conv_3"]["w1"].shape[0] == model.spec("conv_2").out_channels
    # closed-ish generators, so that the frequency rule has something to remove
    gens = {k: {**v, "b2": v["b2"] - 1.0} for k, v in gens.items()}
    x, y = digits.x_train[:300], digits.y_train[:300]
    data = SplitData(x, y, digits.x_train[300:400], digits.y_train[300:400], *digits.info.normalization)
    res = split(jax.random.key(0), model, data, MwTSplitConfig(), generators=gens)
    ms = res.module_set
    layers, binary, _ = record_masks(model, gens, x, digits.info.normalization)
    per = {n: np.stack([_rule(b[y == c].mean(0)) for c in range(10)]) for n, b in zip(layers, binary)}
    np.testing.assert_array_equal(ms.masks["conv_1"] > 0, per["conv_1"] | per["conv_3"])
    np.testing.assert_array_equal(ms.masks["conv_2"] > 0, per["conv_2"])
    np.testing.assert_array_equal(ms.masks["conv_0"], 1.0)
    flat = np.concatenate([per[n] for n in layers], axis=1)
    assert res.details["metrics"]["kernel_retention"] == pytest.approx(flat.mean())  # per layer, as the reference
    assert res.details["metrics"]["generated_layers"] == layers


def test_cli_trains_and_splits_with_mwt_and_refuses_its_flags_elsewhere(mwt_run, tmp_path, capsys):
    from cnnsplit_jax.cli import main

    out, _ = mwt_run
    assert main(["split", "--method", "mwt", "--model-dir", str(out), "--out", str(tmp_path / "m"),
                 "--threshold", "0.8"]) == 0
    res = json.loads((tmp_path / "m" / "split.json").read_text())
    assert res["config"]["threshold"] == 0.8 and res["method"] == "mwt"
    assert "MwT: kernel retention" in capsys.readouterr().out
    # its sub-task module: the MwT model alone is not compared (it is not the model MwT trained)
    assert main(["subtask", "--modules", str(tmp_path / "m"), "--classes", "1,4", "--epochs", "1",
                 "--train-images", "128", "--out", str(tmp_path / "st")]) == 0
    st = json.loads((tmp_path / "st" / "subtask.json").read_text())
    assert st["method"] == "mwt" and st["base_restricted_accuracy"] is None and st["compare_restricted_accuracy"] == {}
    assert "base model" not in capsys.readouterr().out and 0 < st["kernel_retention"] <= 1
    # --alpha sets MwT's loss: refused without --method mwt, before any training
    assert main(["train", "--model", "simcnn", "--dataset", "digits", "--alpha", "0.3", "--out",
                 str(tmp_path / "t")]) == 2
    assert "--alpha" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["train", "--method", "mwt", "--model", "simcnn", "--width", "0.125", "--fc-hidden", "16",
                 "--dataset", "digits", "--recipe", "mwt-quick", "--epochs", "1", "--train-images", "256",
                 "--beta", "2.0", "--out", str(tmp_path / "t")]) == 0
    t = json.loads((tmp_path / "t" / "train.json").read_text())
    assert t["method"] == "mwt" and t["config"]["method_config"] == {"alpha": 0.5, "beta": 2.0}
    assert t["config"]["lr_schedule"] == "cosine" and t["config"]["nesterov"] is True
    assert json.loads((tmp_path / "t" / "model.json").read_text())["mwt"]["beta"] == 2.0


def test_cli_subtask_fine_tunes_any_method_s_module_saves_it_and_compares(digits_modules, digits_run, digits,
                                                                          tmp_path, capsys):
    from cnnsplit_jax.cli import main
    from cnnsplit_jax.splitters.mwt import load_subtask, subtask_logits

    out = tmp_path / "st"
    args = ["subtask", "--modules", str(digits_modules), "--classes", "8,3", "--epochs", "2", "--batch-size", "32",
            "--compare", str(digits_run), "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "subtask.json").read_text())
    assert res["classes"] == [8, 3] and res["method"] == "grad" and res["config"]["epochs"] == 2
    assert res["config"]["nesterov"] is True and res["config"]["lr_schedule"] == "cosine"  # the sub-task recipe
    # the GradSplitter modules' base model is digits_run's model: both restricted accuracies are
    # the same model's, and equal the one computed here
    ms = load_module_set(digits_modules)
    want = restricted_accuracy(ms.base, digits, [8, 3])
    assert res["base_restricted_accuracy"] == pytest.approx(want)
    assert res["compare_restricted_accuracy"] == {str(digits_run): pytest.approx(want)}
    assert res["test_images"] == int(np.isin(digits.y_test, [8, 3]).sum())
    printed = capsys.readouterr().out
    assert "module + new head" in printed and "logits restricted" in printed
    # the saved module and head reproduce the reported accuracy; the module is the union's
    module, head, meta = load_subtask(out)
    union = subtask_masks(ms, [8, 3])
    assert {s.name: s.out_channels for s in module.topology} == {
        s.name: max(1, int(union[s.mask].sum())) for s in ms.base.topology}
    sel = np.isin(digits.y_test, [8, 3])
    y = (digits.y_test[sel] == 3).astype(int)  # labels follow the order given: 8 -> 0, 3 -> 1
    logits = subtask_logits(module, head, digits.x_test[sel], digits.info)
    assert res["test_accuracy"] == pytest.approx(float((logits.argmax(-1) == y).mean()))
    assert meta["subtask"] == {"classes": [8, 3]}
    # the directory is not overwritten by accident; the alias runs the same command
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["reuse", *args[1:], "--overwrite", "--epochs", "1"]) == 0
    assert json.loads((out / "subtask.json").read_text())["config"]["epochs"] == 1
    # a damaged head is refused by name, bad classes before any work
    for victim in (p for p in (out / "head").rglob("*") if p.is_file() and p.parent.name == "d"):  # the arrays' data
        b = bytearray(victim.read_bytes())
        for i in range(16):
            b[len(b) // 2 + i] ^= 0xFF
        victim.write_bytes(bytes(b))
    with pytest.raises(ckpt.CheckpointError):
        load_subtask(out)
    assert main(["subtask", "--modules", str(digits_modules), "--classes", "3", "--out", str(tmp_path / "x")]) == 2
    assert "at least 2 distinct" in capsys.readouterr().err and not (tmp_path / "x").exists()
