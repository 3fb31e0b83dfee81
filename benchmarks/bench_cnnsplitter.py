"""CNNSplitter: one generation at a reduced setup, JAX vs a PyTorch baseline with the
reference's structure.

Setup: 10 classes, ``--population`` individuals per class (100), ``--images`` evaluation
images (200), random weights (the cost does not depend on them), reference genome (10 / 100
groups per layer) and reference initial ratios.

* JAX, phases apart (compile excluded, reported separately): kernel importance; layer
  sensitivity (``--sens-ratios`` ratios x every layer x 10 modules); one GA generation =
  decode all N x P genomes + module logits (dense masked forwards, ``lax.map`` over groups of
  10 individuals, vmapped inside; distinct genomes only, the previous generation's elites
  reused, as the driver does) + the joint fitness + ask/tell of the 10 vmapped GAs.
* PyTorch baseline (the reference's explorer): per individual, decode its genome, cut the
  pruned module out (``extract_module``), build it as a torch module, forward the images,
  keep the class logit. Timed on ``--torch-sample`` individuals and scaled to N x P; the
  reference's recorder (a Python loop over 10^4-10^5 candidate compositions) is *not*
  included, which favours the baseline.

    python benchmarks/bench_cnnsplitter.py [--models simcnn rescnn] [--widths 1 0.125]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, torch_enabled, write_json  # noqa: E402

from cnnsplit_jax.models import build_model, flatten_masks  # noqa: E402
from cnnsplit_jax.models import effective_masks  # noqa: E402
from cnnsplit_jax.modules.extract import extract_module  # noqa: E402
from cnnsplit_jax.splitters import cnnsplitter as cs  # noqa: E402
from cnnsplit_jax.splitters.cnnsplitter import (CNNSplitterGA, FitnessConfig, decode, genome_layout,  # noqa: E402
                                                heuristic_population, importance_order, jaccard_distance_table,
                                                joint_fitness, kernel_importance)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def bench(arch, width, population, n_img, sens_ratios, torch_sample, use_torch, torch_device="cpu"):
    n = 10
    model = build_model(arch, num_classes=n, in_channels=3, width=width, key=0)
    rng = np.random.default_rng(0)
    x_u8 = rng.integers(0, 256, (n_img, 32, 32, 3)).astype(np.uint8)
    y = np.arange(n_img) % n
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    xn = (jnp.asarray(x_u8, jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
    row = {"arch": arch, "width": width, "population": population, "images": n_img, "classes": n}

    # importance (threshold 0: random weights classify nothing with confidence)
    kernel_importance(model, x_u8[:8], y[:8], mean, std, threshold=0.0)  # compile
    imp, row["importance_s"] = _timed(lambda: kernel_importance(model, x_u8, y, mean, std, threshold=0.0))
    order = importance_order(imp)
    # sensitivity
    cs.layer_sensitivity(model, order, xn[:8], y[:8], (1.0,))  # compile
    _, row["sensitivity_s"] = _timed(lambda: cs.layer_sensitivity(model, order, xn, y, sens_ratios))
    row["sensitivity_ratios"] = len(sens_ratios)

    # one generation
    layout = genome_layout(model)
    ga = CNNSplitterGA(population, jnp.zeros(layout.num_genes), num_parents=min(50, population),
                       keep_parents=min(20, population), mutation_percent=5.0)
    params = ga.default_params
    pops = jax.vmap(lambda k: heuristic_population(k, layout, population, (), (0.6, 0.7, 0.8),
                                                   (0.4, 0.5, 0.6, 0.7)))(jax.random.split(jax.random.key(1), n))
    order_j = {k: jnp.asarray(v) for k, v in order.items()}
    decode_all = jax.jit(jax.vmap(jax.vmap(lambda g, o: decode(layout, g, o), in_axes=(0, None)), in_axes=(0, 0)))
    classes = np.repeat(np.arange(n), population)
    fcfg = FitnessConfig()

    cache = [None]  # as the driver: distinct genomes only, the previous generation's elites reused

    def generation(pops, states):
        eff = effective_masks({k: np.asarray(v) for k, v in decode_all(pops, order_j).items()})
        flat = {k: v.reshape(n * population, -1) for k, v in eff.items()}
        rows = np.concatenate([classes[:, None], np.asarray(pops).reshape(n * population, -1)], 1).astype(np.uint8)
        t = time.perf_counter()
        L, cache[0] = cs.cached_module_logits(model, flat, rows, classes, xn, cache[0])
        L = L.reshape(n, population, -1)
        t_logits = time.perf_counter() - t
        t = time.perf_counter()
        D = jaccard_distance_table(jnp.asarray(np.asarray(flatten_masks(model, eff, tied=True)) > 0))
        res = joint_fitness(jnp.asarray(L), jnp.asarray(y), D, list(range(n)), acc_ratio=0.9, generation=1, cfg=fcfg)
        jax.block_until_ready(res.fitness)
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        states, _ = jax.vmap(ga.tell, in_axes=(0, 0, 0, 0, None))(jax.random.split(jax.random.key(2), n), pops,
                                                                   -res.fitness, states, params)
        new, states = jax.vmap(ga.ask, in_axes=(0, 0, None))(jax.random.split(jax.random.key(3), n), states, params)
        jax.block_until_ready(new)
        return new, states, t_logits, t_fit, time.perf_counter() - t

    states = jax.vmap(ga.init, in_axes=(0, 0, 0, None))(jax.random.split(jax.random.key(0), n), pops,
                                                         jnp.zeros((n, population)), params)
    t = time.perf_counter()
    pops2, states, *_ = generation(pops, states)  # first call compiles
    row["generation_first_call_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, _, row["module_logits_s"], row["fitness_s"], row["ask_tell_s"] = generation(pops2, states)
    row["generation_s"] = time.perf_counter() - t

    if use_torch:
        import torch

        from cnnsplit_jax.models.interop import torch_model

        xt = torch.from_numpy(np.asarray(xn).transpose(0, 3, 1, 2).copy()).to(torch_device)
        pop_np = np.asarray(pops2)
        t = time.perf_counter()
        for s in range(torch_sample):
            c, p = s % n, (s * 7) % population
            masks = {k: np.asarray(v) for k, v in decode(layout, pop_np[c, p], order_j).items()}
            mod = extract_module(model, {k: v for k, v in masks.items()}, None, c)
            net = torch_model(mod.model).eval().to(torch_device)
            with torch.no_grad():
                out = []
                for i in range(0, n_img, 128):
                    out.append(net(xt[i : i + 128])[:, c])
                torch.cat(out).cpu().numpy()
        per = (time.perf_counter() - t) / torch_sample
        row["torch_per_individual_s"] = per
        row["torch_generation_s"] = per * n * population
        row["ratio"] = row["generation_s"] / row["torch_generation_s"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["simcnn", "rescnn"])
    p.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.125])
    p.add_argument("--population", type=int, default=100)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--sens-ratios", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--torch-sample", type=int, default=20)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default="results/bench_cnnsplitter.json")
    a = p.parse_args(argv)
    use_torch = torch_enabled(a.no_torch)
    rows = []
    print("| model | importance s | sensitivity s | module logits s | fitness s | ask+tell s | generation s "
          "| compile s | torch generation s (per individual) | **ratio** |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in a.models:
        for w in a.widths:
            r = bench(arch, w, a.population, a.images, tuple(a.sens_ratios), a.torch_sample, use_torch)
            rows.append(r)
            nan = float("nan")
            print(f"| {arch} w{w:g} | {r['importance_s']:.2f} | {r['sensitivity_s']:.1f} | {r['module_logits_s']:.1f} | "
                  f"{r['fitness_s']:.2f} | {r['ask_tell_s']:.3f} | {r['generation_s']:.1f} | "
                  f"{r['generation_first_call_s'] - r['generation_s']:.1f} | "
                  f"{r.get('torch_generation_s', nan):.0f} ({r.get('torch_per_individual_s', nan):.3f}) | "
                  f"**{r.get('ratio', nan):.3f}** |", flush=True)
    write_json(a.out, {"environment": environment(), "rows": rows})
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
