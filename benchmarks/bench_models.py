"""Forward and forward+backward-w.r.t.-masks timings of SimCNN / ResCNN / InceCNN.

Per model (batch 64, width 1 by default) and, with ``--layers``, per conv layer (every
formulation of ``cnnsplit_jax.models.conv``), against a PyTorch model of the same architecture when
torch is installed. Compile time is reported apart; run times are medians of ``--reps`` runs
timed with ``block_until_ready``; GFLOP/s uses XLA's cost analysis.

    python benchmarks/bench_models.py [--models simcnn rescnn incecnn] [--reps 5] [--layers]
                                      [--rounds 3] [--out results/bench_models.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_jax, time_torch, write_json  # noqa: E402

from cnnsplit_jax.models import build_model, ones_masks  # noqa: E402
from cnnsplit_jax.models.conv import conv2d, select_conv_impl  # noqa: E402


def _loss(model, x, y, masks):
    logits = model(x, masks)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def bench_model(arch, batch, width, reps, rounds, torch_mod):
    """Interleaved rounds of (JAX, PyTorch) medians; the ratio is the median of per-round ratios."""
    import statistics

    model = build_model(arch, num_classes=10, in_channels=3, width=width, key=0)
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    y = jnp.arange(batch) % 10
    masks = ones_masks(model)
    fwd = lambda m, x, mk: m(x, mk)  # noqa: E731
    bwd = jax.grad(lambda mk, m, x, y: _loss(m, x, y, mk))  # noqa: E731
    row = {"model": arch, "batch": batch, "width": width, "rounds": rounds, "reps": reps}
    if torch_mod is not None:
        torch = torch_mod
        from cnnsplit_jax.models.interop import torch_model

        tm = torch_model(model)
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        yt = torch.from_numpy(np.asarray(y)).long()
        tmasks = {k: torch.ones(v.shape[0], requires_grad=True) for k, v in masks.items()}

        def tf():
            with torch.no_grad():
                tm(xt, tmasks)

        def tb():
            for v in tmasks.values():
                v.grad = None
            torch.nn.functional.cross_entropy(tm(xt, tmasks), yt).backward()

    res = {k: [] for k in ("fwd", "bwd", "tfwd", "tbwd")}
    for r in range(rounds):
        c, t, gf, _ = time_jax(fwd, model, x, masks, reps=reps)
        res["fwd"].append(t)
        if r == 0:
            row.update(fwd_compile_s=c, fwd_gflop=gf)
        c, t, gfb, _ = time_jax(bwd, masks, model, x, y, reps=reps)
        res["bwd"].append(t)
        if r == 0:
            row.update(bwd_compile_s=c, fwd_bwd_gflop=gfb)
        if torch_mod is not None:
            res["tfwd"].append(time_torch(tf, reps=reps)[0])
            res["tbwd"].append(time_torch(tb, reps=reps)[0])
    med = statistics.median
    row.update(fwd_s=med(res["fwd"]), fwd_bwd_s=med(res["bwd"]))
    row.update(fwd_gflops=row["fwd_gflop"] / row["fwd_s"], fwd_bwd_gflops=row["fwd_bwd_gflop"] / row["fwd_bwd_s"])
    if torch_mod is not None:
        row.update(
            torch_fwd_s=med(res["tfwd"]),
            torch_fwd_bwd_s=med(res["tbwd"]),
            fwd_ratio=med([a / b for a, b in zip(res["fwd"], res["tfwd"])]),
            fwd_bwd_ratio=med([a / b for a, b in zip(res["bwd"], res["tbwd"])]),
        )
    return row


def bench_layers(arch, batch, width, reps, torch_mod):
    model = build_model(arch, num_classes=10, in_channels=3, width=width, key=0)
    # input spatial size of each conv, from a shape trace of the forward pass
    sizes = {}
    import cnnsplit_jax.models.base as M  # ConvBN calls base.conv2d

    real = M.conv2d

    def spy(x, w, b=None, impl=None, stride=1):
        sizes[(x.shape[1], x.shape[3], w.shape[3], w.shape[0])] = True
        return real(x, w, b, impl, stride)

    M.conv2d = spy
    try:
        jax.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 32, 32, 3)))
    finally:
        M.conv2d = real
    rows = []
    for (h, cin, cout, k) in sizes:
        x = jax.random.normal(jax.random.key(0), (batch, h, h, cin))
        w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
        row = {"model": arch, "layer": f"{h}x{h} {cin}->{cout} k{k}",
               "auto": select_conv_impl(h, h, cin, cout, k)}
        for impl in ("native", "im2col", "unrolled"):
            if impl == "unrolled" and (h * h) ** 2 * cin * cout * 4 > 256 * 2**20:
                continue
            if impl == "im2col" and batch * h * h * k * k * cin * 4 > 2**31:
                continue
            f = lambda x, w, impl=impl: jax.nn.relu(conv2d(x, w, impl=impl))  # noqa: E731
            g = jax.grad(lambda x, w, impl=impl: jnp.sum(jax.nn.relu(conv2d(x, w, impl=impl))))
            _, t, gf, _ = time_jax(f, x, w, reps=reps)
            _, tb, _, _ = time_jax(g, x, w, reps=reps)
            row[f"{impl}_fwd_ms"] = 1e3 * t
            row[f"{impl}_fwd_bwd_ms"] = 1e3 * tb
            if impl == "native":
                row["gflop"] = gf
        if torch_mod is not None:
            torch = torch_mod
            conv = torch.nn.Conv2d(cin, cout, k, padding=(k - 1) // 2).eval()
            xt = torch.randn(batch, cin, h, h)
            with torch.no_grad():
                row["torch_fwd_ms"] = 1e3 * time_torch(lambda: torch.relu(conv(xt)), reps=reps)[0]
            xg = xt.clone().requires_grad_(True)

            def tb():
                xg.grad = None
                torch.relu(conv(xg)).sum().backward(inputs=[xg])

            row["torch_fwd_bwd_ms"] = 1e3 * time_torch(tb, reps=reps)[0]
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["simcnn", "rescnn", "incecnn"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5, help="timed runs per round (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved JAX/PyTorch rounds")
    p.add_argument("--layers", action="store_true", help="also time every conv layer shape")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default="results/bench_models.json")
    a = p.parse_args(argv)
    try:
        import torch

        torch_mod = None if a.no_torch else torch
    except ImportError:
        torch_mod = None
    result = {"environment": environment(), "models": [], "layers": []}
    print("| model | fwd ms | fwd+bwd(masks) ms | fwd GFLOP/s | fwd+bwd GFLOP/s | compile fwd/bwd s | torch fwd ms | torch fwd+bwd ms | fwd ratio | fwd+bwd ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in a.models:
        r = bench_model(arch, a.batch, a.width, a.reps, a.rounds, torch_mod)
        result["models"].append(r)
        print(f"| {arch} | {1e3 * r['fwd_s']:.0f} | {1e3 * r['fwd_bwd_s']:.0f} | {r['fwd_gflops']:.0f} | {r['fwd_bwd_gflops']:.0f} | "
              f"{r['fwd_compile_s']:.1f}/{r['bwd_compile_s']:.1f} | "
              f"{1e3 * r.get('torch_fwd_s', float('nan')):.0f} | {1e3 * r.get('torch_fwd_bwd_s', float('nan')):.0f} | "
              f"{r.get('fwd_ratio', float('nan')):.2f} | {r.get('fwd_bwd_ratio', float('nan')):.2f} |", flush=True)
    if a.layers:
        print("\n| model | layer | auto | native fwd/bwd ms | im2col fwd/bwd ms | unrolled fwd/bwd ms | torch fwd/bwd ms |")
        print("|---|---|---|---|---|---|---|")
        for arch in a.models:
            for r in bench_layers(arch, a.batch, a.width, a.reps, torch_mod):
                result["layers"].append(r)
                cell = lambda k: (f"{r[k + '_fwd_ms']:.1f}/{r[k + '_fwd_bwd_ms']:.1f}" if k + "_fwd_ms" in r else "–")  # noqa: E731
                print(f"| {arch} | {r['layer']} | {r['auto']} | {cell('native')} | {cell('im2col')} | "
                      f"{cell('unrolled')} | {cell('torch')} |", flush=True)
    write_json(a.out, result)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
