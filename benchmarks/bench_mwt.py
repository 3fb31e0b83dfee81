"""MwT's training step against a standard training step (same run, same machine), and both
against PyTorch baselines written to the reference's structure (``MaskConvBN``: conv -> BN ->
x generator mask -> ReLU, the first conv unmasked; loss ``CE + 0.5 cohesion + 1.5 coupling``;
SGD Nesterov 0.9).

    python benchmarks/bench_mwt.py --width 0.25 --batch 128 --out results/bench_mwt.json

Timings are medians of ``--reps`` steps after a warm-up, compile apart (JAX: the first call;
``block_until_ready``), PyTorch synchronised before each clock read. An "epoch" is the step
time x the steps of a 50,000-image epoch (CIFAR-10's), as the reference trains.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_torch, torch_enabled, write_json  # noqa: E402

from cnnsplit_jax.data import Dataset, DatasetInfo  # noqa: E402
from cnnsplit_jax.models import build_model  # noqa: E402
from cnnsplit_jax.splitters.mwt import MwTObjective  # noqa: E402
from cnnsplit_jax.train import RECIPES, TrainConfig, make_optimizer  # noqa: E402
from cnnsplit_jax.train.loop import _train_step  # noqa: E402

EPOCH_IMAGES = 50_000


def _synthetic(batch: int) -> Dataset:
    rng = np.random.default_rng(0)
    n = 4 * batch
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.int32)
    info = DatasetInfo("synthetic", tuple(str(i) for i in range(10)), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Dataset(x, y, x[:batch], y[:batch], info)


def jax_step_seconds(width: float, fc_hidden: int, batch: int, reps: int, modular: bool,
                     arch: str = "simcnn") -> tuple[float, float]:
    """(compile s, median step s) of one training step of ``arch`` (SimCNN, or MwT's
    ``vgg16_bn`` / ``resnet18``), standard or MwT; ``fc_hidden``: SimCNN's FC width."""
    ds = _synthetic(batch)
    cfg = TrainConfig(**{**RECIPES["mwt-quick"], "batch_size": batch, "augment": False})
    kw = {"fc_hidden": fc_hidden} if arch == "simcnn" else {}
    model = build_model(arch, num_classes=10, in_channels=3, width=width, key=jax.random.key(0), **kw)
    objective = MwTObjective() if modular else None
    tx = make_optimizer(cfg, 4)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {"params": params, "stats": stats, "key": jax.random.key(0)}
    if modular:
        state["extra"] = objective.init(jax.random.key(1), model)
    state["opt"] = tx.init((state["params"], state["extra"]) if modular else state["params"])
    step = _train_step(graphdef, tx, ds, cfg, None, objective)
    idx = [jnp.arange(i * batch, (i + 1) * batch) for i in range(4)]
    t0 = time.perf_counter()
    state, loss, _ = step(state, idx[0])
    jax.block_until_ready((state, loss))
    compile_s = time.perf_counter() - t0
    runs = []
    for r in range(reps + 1):
        t = time.perf_counter()
        state, loss, _ = step(state, idx[r % 4])
        jax.block_until_ready((state, loss))
        runs.append(time.perf_counter() - t)
    return compile_s, statistics.median(runs[1:])


def torch_step(width: float, fc_hidden: int, batch: int, modular: bool, device: str = "cpu"):
    """A function running one training step of the reference-structured SimCNN in PyTorch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    chans = [max(1, round(c * width)) for c in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)]
    pool_after = {1, 3, 6, 9, 12}

    class Generator(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            h = cout if cout < 128 else cout // 2
            self.net = nn.Sequential(nn.Linear(cin, h, bias=False), nn.ReLU(True), nn.Linear(h, cout))

        def forward(self, x):
            return torch.relu(torch.tanh(self.net(x.mean((2, 3)))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs, self.bns, self.gens = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            cin = 3
            for i, c in enumerate(chans):
                self.convs.append(nn.Conv2d(cin, c, 3, padding=1))
                self.bns.append(nn.BatchNorm2d(c))
                self.gens.append(Generator(cin, c) if modular and i > 0 else nn.Identity())
                cin = c
            self.head = nn.Sequential(nn.Dropout(), nn.Linear(cin, fc_hidden), nn.ReLU(True), nn.Dropout(),
                                      nn.Linear(fc_hidden, fc_hidden), nn.ReLU(True), nn.Linear(fc_hidden, 10))

        def forward(self, x):
            masks = []
            for i, (conv, bn, gen) in enumerate(zip(self.convs, self.bns, self.gens)):
                y = bn(conv(x))
                if modular and i > 0:
                    m = gen(x)
                    masks.append(m)
                    y = y * m[:, :, None, None]
                x = torch.relu(y)
                if i in pool_after:
                    x = F.max_pool2d(x, 2)
            return self.head(x.flatten(1)), masks

    def cos_losses(masks, labels):
        same = (labels[:, None] == labels[None, :]).float().triu(1)
        diff = (labels[:, None] != labels[None, :]).float().triu(1)
        coh, cou = [], []
        for m in masks:
            u = F.normalize(m, dim=1)
            s = u @ u.T
            coh.append(1 - (s * same).sum() / same.sum())
            cou.append((s * diff).sum() / diff.sum())
        return sum(coh) / len(coh), sum(cou) / len(cou)

    net = Net().to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = (torch.arange(batch) % 10).to(device)

    def step():
        logits, masks = net(x)
        loss = F.cross_entropy(logits, y)
        if modular:
            coh, cou = cos_losses(masks, y)
            loss = loss + 0.5 * coh + 1.5 * cou
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bench(width: float, fc_hidden: int, batch: int, reps: int, torch_on: bool, torch_device: str = "cpu",
          arch: str = "simcnn") -> dict:
    """One row: standard and MwT steps in JAX (and PyTorch, SimCNN only), ratios within the
    same run."""
    steps = -(-EPOCH_IMAGES // batch)
    torch_on = torch_on and arch == "simcnn"  # the PyTorch baseline is the reference's SimCNN
    r = {"model": arch, "width": width, "fc_hidden": fc_hidden if arch == "simcnn" else None, "batch": batch}
    for kind, modular in (("standard", False), ("mwt", True)):
        c, s = jax_step_seconds(width, fc_hidden, batch, reps, modular, arch)
        r[f"{kind}_compile_s"], r[f"{kind}_step_s"], r[f"{kind}_epoch_s"] = c, s, s * steps
        if torch_on:
            ts, _ = time_torch(torch_step(width, fc_hidden, batch, modular, torch_device), reps=reps, warmup=2,
                               device=torch_device)
            r[f"torch_{kind}_step_s"] = ts
            r[f"{kind}_ours_over_torch"] = s / ts
    r["mwt_over_standard"] = r["mwt_step_s"] / r["standard_step_s"]
    if torch_on:
        r["torch_mwt_over_standard"] = r["torch_mwt_step_s"] / r["torch_standard_step_s"]
    return r


def table(rows) -> str:
    nan = float("nan")
    out = ["| model | width | batch | standard ms | MwT ms | MwT / standard | PyTorch standard ms | PyTorch MwT ms | "
           "PyTorch MwT / standard | ours / PyTorch (MwT) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.get('model', 'simcnn')} | {r['width']:g} | {r['batch']} | {1e3 * r['standard_step_s']:.1f} | {1e3 * r['mwt_step_s']:.1f} | "
                   f"{r['mwt_over_standard']:.2f} | {1e3 * r.get('torch_standard_step_s', nan):.1f} | "
                   f"{1e3 * r.get('torch_mwt_step_s', nan):.1f} | {r.get('torch_mwt_over_standard', nan):.2f} | "
                   f"{r.get('mwt_ours_over_torch', nan):.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=float, nargs="+", default=[0.25])
    p.add_argument("--arch", nargs="+", default=["simcnn"], choices=["simcnn", "vgg16_bn", "resnet18"],
                   help="models (PyTorch's baseline: SimCNN only)")
    p.add_argument("--fc-hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default="results/bench_mwt.json")
    a = p.parse_args(argv)
    torch_on = torch_enabled(a.no_torch)
    rows = [bench(w, a.fc_hidden, a.batch, a.reps, torch_on, arch=arch) for arch in a.arch for w in a.width]
    write_json(a.out, {"environment": environment(), "rows": rows})
    print(table(rows))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
