"""Concern identification (Pan & Rajan): decomposition time of ResNet-20 into 10 modules,
vectorised over classes (ours) vs per-class loops.

Setup: ResNet-20 (``--width``), 10 classes, ``--per-class`` training images per class
(random pixels, random weights: the cost does not depend on them), every image a concerned
input of its class, negatives 1:1 (so each image is also a negative of other classes).

* ours: ``concern.decompose`` (CI + TI + channeling + MC-BLN). Every image runs through the
  model once; all 10 modules' maps come from one ``membership @ active`` matmul per node.
  Compile time (first call minus a warm call) is reported apart; medians of ``--reps`` runs.
* PyTorch per-class loop (the paper's structure): for each class, forward its concerned
  inputs, AND the "<= 0" maps; forward its negatives, AND again. Same weights (converted),
  same sample sets; the maps are checked equal to ours.
* JAX per-class loop: the same loop with our jitted forward, to separate the gain of the
  vectorisation from the framework.

    python benchmarks/bench_concern.py [--width 1] [--per-class 200] [--out results/bench_concern.json]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, torch_enabled, write_json  # noqa: E402

from cnnsplit_jax.splitters import concern as C  # noqa: E402
from cnnsplit_jax.data import normalize  # noqa: E402
from cnnsplit_jax.models import build_model  # noqa: E402

MEAN, STD = (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)


def torch_forward(model):
    """A PyTorch function ``f(x_nchw) -> {node: pre-activation}`` with the model's weights."""
    import torch
    import torch.nn.functional as F

    specs = {s.name: s for s in model.topology}
    w = {n: (torch.tensor(np.asarray(getattr(model, n).kernel[...])).permute(3, 2, 0, 1).contiguous(),
             torch.tensor(np.asarray(getattr(model, n).bias[...]))) for n in specs}

    def conv(name, x):
        k, b = w[name]
        s = specs[name]
        if s.stride == 1:
            return F.conv2d(x, k, b, padding=s.ksize // 2)
        h = x.shape[-1]
        pad = max((math.ceil(h / s.stride) - 1) * s.stride + s.ksize - h, 0)  # TF "same"
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return F.conv2d(x, k, b, stride=s.stride)

    @torch.no_grad()
    def forward(x):
        rec = {}
        h = rec.setdefault("conv_0", conv("conv_0", x)).relu()
        for st in range(3):
            for bl in range(model.blocks):
                p = f"s{st}b{bl}"
                a = rec.setdefault(f"{p}_conv1", conv(f"{p}_conv1", h)).relu()
                short = conv(f"{p}_short", h) if st > 0 and bl == 0 else h
                h = rec.setdefault(f"{p}_add", conv(f"{p}_conv2", a) + short).relu()
        return rec

    return forward


def loop_maps(forward_batches, sets_pos, sets_neg):
    """Per class: AND over its concerned inputs, then over its negatives, of (pre <= 0)."""
    out = []
    for pos, neg in zip(sets_pos, sets_neg):
        acc = None
        for idx in (pos, neg):
            for rec in forward_batches(idx):
                for k, v in rec.items():
                    m = v.all(0)
                    acc = {} if acc is None else acc
                    acc[k] = m if k not in acc else acc[k] & m
        out.append(acc)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="results/bench_concern.json")
    args = ap.parse_args(argv)

    k = 10
    model = build_model("resnet20", num_classes=k, in_channels=3, width=args.width, key=0)
    rng = np.random.default_rng(0)
    n = k * args.per_class
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n) % k
    cfg = C.ConcernConfig(batch_size=args.batch)
    key = jax.random.key(0)

    t0 = time.perf_counter()
    dec = C.decompose(model, x, y, MEAN, STD, cfg, key=key)
    first = time.perf_counter() - t0
    runs = []
    for _ in range(args.reps):
        t = time.perf_counter()
        dec = C.decompose(model, x, y, MEAN, STD, cfg, key=key)
        runs.append(time.perf_counter() - t)
    ours = statistics.median(runs)
    res = {"bench": "concern", "model": "resnet20", "width": args.width, "classes": k, "images": n,
           "negative_ratio": 1.0, "batch": args.batch, "ours_s": ours, "ours_runs": runs,
           "ours_compile_s": max(first - ours, 0.0), "images_forwarded_ours": dec.stats["images_forwarded"],
           "environment": environment()}
    pos, neg = C.sample_sets(y, k, cfg, key)
    res["images_forwarded_loop"] = int(sum(len(p) + len(q) for p, q in zip(pos, neg)))
    # the loops compute CI + TI maps: compare with ours before MC-BLN
    ci_ti = C.decompose(model, x, y, MEAN, STD, C.ConcernConfig(batch_size=args.batch, backtrack="none"),
                        key=key).inactive

    fwd = jax.jit(lambda xb: model.node_forward(xb, record=True)[1])

    def jax_batches(idx):
        for i in range(0, len(idx), args.batch):
            rec = fwd(jnp.asarray(normalize(x[idx[i:i + args.batch]], MEAN, STD)))
            yield {kk: np.asarray(v) <= 0 for kk, v in rec.items()}

    jax_batches(pos[0][:args.batch]).__next__()  # compile the full batch shape
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        maps = loop_maps(jax_batches, pos, neg)
        times.append(time.perf_counter() - t)
    res["jax_loop_s"] = statistics.median(times)
    assert all(np.array_equal(maps[c][kk], ci_ti[kk][c]) for c in range(k) for kk in ci_ti), "JAX loop differs"

    if torch_enabled(args.no_torch):
        import torch

        tf = torch_forward(model)
        xt = torch.tensor(normalize(x, MEAN, STD)).permute(0, 3, 1, 2).contiguous()

        def torch_batches(idx):
            for i in range(0, len(idx), args.batch):
                rec = tf(xt[torch.as_tensor(idx[i:i + args.batch])])
                yield {kk: v <= 0 for kk, v in rec.items()}

        loop_maps(torch_batches, [pos[0][:args.batch]], [neg[0][:args.batch]])  # warm-up
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            tmaps = loop_maps(torch_batches, pos, neg)
            times.append(time.perf_counter() - t)
        res["torch_loop_s"] = statistics.median(times)
        agree = np.mean([np.mean(tmaps[c][kk].permute(1, 2, 0).numpy() == ci_ti[kk][c])
                         for c in range(k) for kk in ci_ti])
        res["torch_maps_agreement"] = float(agree)  # float32 sign ties may differ at ~1e-6
        res["speedup_vs_torch_loop"] = res["torch_loop_s"] / ours
    res["speedup_vs_jax_loop"] = res["jax_loop_s"] / ours
    write_json(args.out, res)
    cols = ["width", "images", "ours_s", "ours_compile_s", "jax_loop_s", "torch_loop_s",
            "speedup_vs_jax_loop", "speedup_vs_torch_loop"]
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join(f"{res[c]:.3g}" if isinstance(res.get(c), float) else str(res.get(c, "-"))
                            for c in cols) + " |")


if __name__ == "__main__":
    main()
