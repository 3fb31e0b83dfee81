"""``reproduce.py``'s last stage: the authors' own code beside ours, on the same device, with
the same weights and the same images, interleaved round by round.

* GradSplitter: their ``GradSplitter`` and model classes from a checkout of their repository
  (``CHECKOUT/src``), through ``bench_gradsplitter.bench`` (modularity and head steps).
* CNNSplitter: their per-individual fitness evaluation (``utils.module_tools.cal_fitness``:
  decode, cut the module out, forward the search images) for a sample of our population,
  against one generation of ours (``cnnsplitter.step``, all classes). Their generation is the
  sample's mean times population x classes (their explorers evaluate individuals one by one).
  Their decode is also checked against ours on every sampled genome (``decode_agrees``).

Their classes build RGB models of width 1 only: a Fashion-MNIST model is given to both sides
as its RGB equivalent (the first conv's kernel repeated over three channels and divided by
three, the image repeated over three channels: the same function). The checkouts are the
user's; nothing of them is copied here.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

import bench_gradsplitter
from cnnsplit_jax import checkpoint as ckpt
from cnnsplit_jax.data import normalize
from cnnsplit_jax.models.interop import load_torch_state_dict, to_torch_state_dict
from cnnsplit_jax.pipeline.runs import run_data
from cnnsplit_jax.splitters import cnnsplitter as cs

#: top-level names both reference repositories use; purged between checkouts
_THEIR_PACKAGES = ("models", "utils", "splitters", "global_configure", "configures")


def rgb_equivalent(model):
    """``model`` reading 3 identical channels: the first conv's kernel repeated over them / 3."""
    if model.in_channels == 3:
        return model
    sd = to_torch_state_dict(model)
    first = next(k for k, v in sd.items() if np.asarray(v).ndim == 4)
    w = np.asarray(sd[first])
    if w.shape[1] != 1:
        raise ValueError(f"expected a 1-channel first conv, got {w.shape}")
    sd[first] = np.repeat(w, 3, axis=1) / 3.0
    return load_torch_state_dict(model.arch, sd)


def rgb_images(x_u8: np.ndarray, mean, std) -> tuple[np.ndarray, tuple, tuple]:
    """uint8 [N, H, W, 1] -> ([N, H, W, 3], mean x 3, std x 3)."""
    if x_u8.shape[-1] == 3:
        return x_u8, tuple(mean), tuple(std)
    return np.repeat(x_u8, 3, axis=-1), tuple(mean) * 3, tuple(std) * 3


@contextlib.contextmanager
def checkout(path: str | Path, marker: str):
    """``path/src`` first on ``sys.path``, with the other checkout's same-named packages unloaded."""
    src = Path(path) / "src"
    if not (src / marker).is_file():
        raise SystemExit(f"{path}: expected a checkout of the authors' repository ({src / marker} is missing)")
    for name in list(sys.modules):
        if name.split(".")[0] in _THEIR_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        yield src
    finally:
        sys.path.remove(str(src))


def gradsplitter_rows(path, out: Path, data_dir, *, rounds: int = 3, batch: int = 64) -> list[dict]:
    """Per trained GradSplitter model in ``out`` (``simcnn``, ``rescnn``): our steps and theirs."""
    rows = []
    for arch in ("simcnn", "rescnn"):
        run = out / arch
        if not (run / "train.json").exists():
            continue
        model, meta = ckpt.load_model(run)
        if model.width != 1.0:
            rows.append({"model": arch, "skipped": f"width {model.width}: their classes build width 1 only"})
            continue
        rd = run_data(meta, data_dir)
        first = rd.train_idx[:batch]  # a batch of GradSplitter's training split
        x, mean, std = rgb_images(rd.ds.x_train[first], meta["normalization"]["mean"], meta["normalization"]["std"])
        xn = normalize(x, mean, std)
        with checkout(path, f"splitters/{arch}_splitter.py"):
            rows.append(bench_gradsplitter.bench(arch, 1.0, batch, model.num_classes, 5, rounds, len(rd.train_idx),
                                                 False, reference=str(path), model=rgb_equivalent(model), images=xn,
                                                 labels=rd.ds.y_train[first]))
    return [r for r in rows if "skipped" not in r] or rows


def _their_configs(pb: cs.Problem, order: dict, c: int) -> SimpleNamespace:
    """The fields of their ``Configures`` that ``decode`` reads, for class ``c``."""
    layers = pb.layout.layers
    sens = [i for i, lay in enumerate(layers) if lay.point in set(pb.cfg.sensitive or ())]
    other = [i for i in range(len(layers)) if i not in sens]
    return SimpleNamespace(
        model_name="simcnn", sensitive_layer_idx=sens,
        sensitive_layer_kernel=[layers[i].size for i in sens], sensitive_layer_group=[layers[i].num_groups for i in sens],
        non_sensitive_layer_kernel=[layers[i].size for i in other],
        non_sensitive_layer_group=[layers[i].num_groups for i in other],
        sorted_kernel_idx=[np.asarray(order[lay.point][c]).tolist() for lay in layers])


def cnnsplitter_row(path, run: Path, cfg: cs.CNNSplitterConfig, data_dir, *, rounds: int = 3,
                    sample: int = 8) -> dict:
    """One generation of ours against ``sample`` individuals of theirs per round."""
    import torch

    model, meta = ckpt.load_model(run)
    if model.width != 1.0 or model.arch != "simcnn_cnnsplitter":
        return {"skipped": f"{model.arch} width {model.width}: their explorer builds the width-1 SimCNN only"}
    rd = run_data(meta, data_dir)
    x, mean, std = rgb_images(rd.ds.x_train[rd.val_idx], meta["normalization"]["mean"], meta["normalization"]["std"])
    y = rd.ds.y_train[rd.val_idx]
    model = rgb_equivalent(model)
    prep = cs.prepare(model, x, y, mean, std, cfg)
    pb = cs.problem(model, cfg, prep, x, y, mean, std)
    key = jax.random.key(cfg.seed)
    state, _ = cs.step(key, cs.init(key, pb), pb)  # generation 0 compiles the evaluation,
    state, _ = cs.step(key, state, pb)  # generation 1 the GA's ask / tell: neither is timed
    n, pop = model.num_classes, cfg.population
    with checkout(path, "utils/module_tools.py"):
        tools = importlib.import_module("utils.module_tools")
        net = importlib.import_module("models.simcnn").SimCNN(num_classes=n)
        net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in to_torch_state_dict(model).items()})
        dev = tools.device
        net = net.to(dev).eval()
        xt = torch.from_numpy(np.asarray(pb.x_fit).transpose(0, 3, 1, 2).copy()).to(dev)
        yt = torch.from_numpy(np.asarray(pb.y_fit, np.int64)).to(dev)
        batches = [(xt[i:i + 256], yt[i:i + 256]) for i in range(0, len(yt), 256)]  # their loader's batch
        order = {k: np.asarray(v) for k, v in pb.order.items()}
        ours, theirs, agree = [], [], True
        for r in range(rounds):
            t = time.perf_counter()
            state, _ = cs.step(key, state, pb)
            ours.append(time.perf_counter() - t)
            pops = np.asarray(state.population).astype(np.int64)
            picks = [((r * sample + s) % n, (s * 7 + r) % pop) for s in range(sample)]
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per empty layer
                for c, i in picks:
                    tools.cal_fitness(pops[c, i], net, c, batches, _their_configs(pb, order, c))
            theirs.append((time.perf_counter() - t) / sample)
            for c, i in picks:  # their decode against ours, outside the clock
                info = tools.decode(pops[c, i], _their_configs(pb, order, c))
                mine = cs.decode(pb.layout, pops[c, i], {k: v[c] for k, v in order.items()})
                agree &= all(sorted(info[f"conv_{j}"]) == np.flatnonzero(np.asarray(mine[lay.point])).tolist()
                             for j, lay in enumerate(pb.layout.layers))
    med = statistics.median
    per = med(theirs)
    return {"population": pop, "classes": n, "images": int(len(pb.y_fit)), "sample": sample, "rounds": rounds,
            "generation_s": med(ours), "reference_per_individual_s": per,
            "reference_generation_s": per * pop * n, "ratio": med(ours) / (per * pop * n),
            "decode_agrees": bool(agree), "reference_device": str(dev)}
