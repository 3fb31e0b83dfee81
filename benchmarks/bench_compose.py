"""Composition throughput: images/s of a 10-module composed model.

Variants (same modules, same images, scores [B, 10]):
  * ``masked``            compose(form="masked"): one vmap over the modules' masks on the
                          shared base model (dense FLOPs: every module costs the full model);
  * ``extracted_vmap``    pruned modules zero-padded to a common shape, one vmap;
  * ``extracted_unrolled`` pruned modules, each its own shapes, unrolled in one jitted call;
  * ``jax_loop``          a Python loop calling each pruned module's own jitted function;
  * ``torch_loop``        a Python loop over pruned PyTorch modules (as the reference composes:
                          ``for module in modules: module(x)``), ``torch.no_grad``.

Modules: ``--keep`` is the fraction of kernels each module keeps per layer (random masks;
GradSplitter's measured retention is 0.55-0.80 in the README), or ``--modules MOD_DIR`` for
a real module set. Compile time apart; medians of ``--reps`` runs; JAX and PyTorch
interleaved in ``--rounds`` rounds; ratios are medians of per-round ratios.

    python benchmarks/bench_compose.py [--models simcnn rescnn] [--widths 1 0.125] [--batches 64]
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

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_jax, time_torch, torch_enabled, write_json  # noqa: E402

from cnnsplit_jax.compose import Pick, apply, compose  # noqa: E402
from cnnsplit_jax.models import build_model, mask_points  # noqa: E402
from cnnsplit_jax.modules.extract import extract_all, forward_flops  # noqa: E402
from cnnsplit_jax.modules.forward import extracted_scores as module_scores  # noqa: E402
from cnnsplit_jax.modules.heads import init_heads  # noqa: E402
from cnnsplit_jax.modules.module_set import ModuleSet, load_module_set  # noqa: E402


def synthetic_set(arch, width, keep, n=10, seed=0):
    model = build_model(arch, num_classes=n, in_channels=3, width=width, key=seed)
    rng = np.random.default_rng(seed)
    masks = {p.name: (rng.random((n, p.size)) < keep).astype(np.float32) for p in mask_points(model)}
    heads = init_heads(jax.random.key(seed), n, n)
    meta = {"dataset": "synthetic", "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    return ModuleSet(model, masks, heads, meta)


def torch_loop_fn(mods, x_np, mean, std, device="cpu"):
    import torch

    from cnnsplit_jax.models.interop import torch_model

    nets = [torch_model(m.model).eval().to(device) for m in mods]
    heads = [tuple(torch.from_numpy(np.array(h, np.float32)).to(device) for h in m.head) for m in mods]
    xt = torch.from_numpy(((x_np / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2).copy()).to(device)

    def run():
        with torch.no_grad():
            out = []
            for net, (w1, b1, w2, b2) in zip(nets, heads):
                z = torch.relu(net(xt))
                out.append(torch.sigmoid(torch.relu(z @ w1 + b1) @ w2 + b2))
            return torch.stack(out, 1)

    return run


def bench(ms: ModuleSet, batch: int, reps: int, rounds: int, use_torch: bool, label: str,
          torch_device: str = "cpu") -> dict:
    n = ms.num_modules
    picks = [Pick(ms, c) for c in range(n)]
    rng = np.random.default_rng(1)
    x_np = rng.integers(0, 256, (batch, 32, 32, ms.base.in_channels)).astype(np.uint8)
    x = jnp.asarray(x_np)
    mean, std = (np.asarray(v, np.float32) for v in ms.normalization)
    comps = {
        "masked": compose(picks, form="masked"),
        "extracted_vmap": compose(picks, form="extracted", execution="vmap"),
        "extracted_unrolled": compose(picks, form="extracted", execution="unrolled"),
    }
    mods = extract_all(ms.base, ms.masks, ms.heads)
    xn = jnp.asarray((x_np / 255.0 - mean) / std, jnp.float32)

    def jax_loop():
        return jax.block_until_ready([module_scores(m, xn) for m in mods])

    row = {"label": label, "arch": ms.base.arch, "width": ms.base.width, "batch": batch, "modules": n,
           "mean_module_flops_ratio": float(np.mean([forward_flops(m.model) for m in mods]) / forward_flops(ms.base))}
    t0 = time.perf_counter()
    jax_loop()
    row["jax_loop_compile_s"] = time.perf_counter() - t0
    compiled = {}
    for k, comp in comps.items():
        c_s, _, _, _ = time_jax(apply, comp, x, reps=1, warmup=0)
        row[f"{k}_compile_s"] = c_s
        compiled[k] = jax.jit(apply).lower(comp, x).compile()
    torch_run = torch_loop_fn(mods, x_np, mean, std, torch_device) if use_torch else None
    per = {k: [] for k in [*comps, "jax_loop", "torch_loop"]}
    for _ in range(rounds):
        for k, comp in comps.items():
            f = compiled[k]
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(f(comp, x))
                per[k].append(time.perf_counter() - t)
        for _ in range(reps):
            t = time.perf_counter()
            jax_loop()
            per["jax_loop"].append(time.perf_counter() - t)
        if torch_run is not None:
            per["torch_loop"].append(time_torch(torch_run, reps=reps, device=torch_device)[0])
    for k, v in per.items():
        if v:
            row[f"{k}_s"] = statistics.median(v)
            row[f"{k}_images_per_s"] = batch / statistics.median(v)
    ours = [k for k in (*comps, "jax_loop")]
    row["best"] = min(ours, key=lambda k: row[f"{k}_s"])
    if torch_run is not None:
        row["torch_over_best"] = row["torch_loop_s"] / row[f"{row['best']}_s"]
        for k in ours:
            row[f"{k}_speedup_vs_torch"] = row["torch_loop_s"] / row[f"{k}_s"]
    # check: every variant computes the same scores
    ref = np.asarray(compiled["masked"](comps["masked"], x))
    for k in ("extracted_vmap", "extracted_unrolled"):
        np.testing.assert_allclose(np.asarray(compiled[k](comps[k], x)), ref, rtol=2e-3, atol=2e-4)
    return row


def bench_cross_model(arch, width, keep, batch, reps) -> dict:
    """10 masked modules from two base models of one structure: one vmap over stacked base
    parameters (batched kernels: grouped convolutions) vs one vmap per base model."""
    a, b = synthetic_set(arch, width, keep, seed=0), synthetic_set(arch, width, keep, seed=1)
    picks = [Pick(a if c % 2 == 0 else b, c) for c in range(10)]
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (batch, 32, 32, 3)).astype(np.uint8))
    row = {"arch": arch, "width": width, "batch": batch}
    for ex in ("vmap", "unrolled"):
        c_s, run_s, _, _ = time_jax(apply, compose(picks, form="masked", execution=ex), x, reps=reps)
        row[f"{ex}_compile_s"], row[f"{ex}_s"] = c_s, run_s
    row["vmap_over_unrolled"] = row["vmap_s"] / row["unrolled_s"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["simcnn", "rescnn"])
    p.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.125])
    p.add_argument("--batches", nargs="+", type=int, default=[64])
    p.add_argument("--keep", type=float, default=0.55)
    p.add_argument("--modules", default=None, help="a real module set instead of random masks")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--cross-model", action="store_true",
                   help="also time masked modules of two base models: stacked-parameter vmap vs per-base vmaps")
    p.add_argument("--out", default="results/bench_compose.json")
    a = p.parse_args(argv)
    use_torch = torch_enabled(a.no_torch)
    sets = []
    if a.modules:
        sets.append((load_module_set(a.modules), a.modules))
    else:
        for arch in a.models:
            for w in a.widths:
                sets.append((synthetic_set(arch, w, a.keep), f"{arch} w{w:g} keep {a.keep}"))
    cols = ["masked", "extracted_vmap", "extracted_unrolled", "jax_loop", "torch_loop"]
    print("| modules | batch | FLOPs/module | " + " | ".join(f"{c} img/s" for c in cols)
          + " | best | best / torch |")
    print("|---|---|---|" + "---|" * len(cols) + "---|---|")
    rows = []
    for ms, label in sets:
        for b in a.batches:
            r = bench(ms, b, a.reps, a.rounds, use_torch, label)
            rows.append(r)
            vals = " | ".join(f"{r.get(f'{c}_images_per_s', float('nan')):.0f}" for c in cols)
            print(f"| {label} | {b} | {r['mean_module_flops_ratio']:.2f} | {vals} | {r['best']} | "
                  f"{r.get('torch_over_best', float('nan')):.2f} |", flush=True)
    cross = []
    if a.cross_model:
        print("\n| model | batch | 2 bases, one vmap (grouped convs) s | one vmap per base s | ratio |\n|---|---|---|---|---|")
        for arch in a.models:
            for w in a.widths:
                r = bench_cross_model(arch, w, a.keep, max(a.batches), a.reps)
                cross.append(r)
                print(f"| {arch} w{w:g} | {r['batch']} | {r['vmap_s']:.3f} | {r['unrolled_s']:.3f} | "
                      f"{r['vmap_over_unrolled']:.2f} |", flush=True)
    write_json(a.out, {"environment": environment(), "rows": rows, "cross_model": cross})
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
