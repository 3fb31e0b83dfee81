"""What the max-pool gradient fix costs: the GradSplitter modularization step (width 1, batch
64, 10 modules) with our pooling (gradient to the first maximum of each window, a custom VJP)
and with the plain reshape + max (gradient split among tied maxima), interleaved in one
process; compile apart, medians.

    python benchmarks/bench_pooling.py [--models simcnn rescnn incecnn] [--reps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, time_jax, write_json  # noqa: E402

import cnnsplit_jax.models.cnn as cnn  # noqa: E402
from cnnsplit_jax.models import build_model  # noqa: E402
from cnnsplit_jax.models.conv import _pool, max_pool_2x2  # noqa: E402
from cnnsplit_jax.modules.forward import default_chunk  # noqa: E402
from cnnsplit_jax.splitters import gradsplitter as gs  # noqa: E402
from cnnsplit_jax.splitters.gradsplitter.loss import loss_fn  # noqa: E402


def step_fn(model, chunk, alpha):
    def step(masks, heads, x, y):
        return jax.value_and_grad(lambda m: loss_fn({"masks": m, "heads": heads}, model, x, y, alpha, chunk)[0])(masks)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["simcnn", "rescnn", "incecnn"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="results/bench_pooling.json")
    a = p.parse_args(argv)
    rows = []
    print("| model | first-max pooling step s | plain pooling step s | ratio | compile s (first-max / plain) |")
    print("|---|---|---|---|---|")
    for arch in a.models:
        model = build_model(arch, num_classes=10, in_channels=3, width=1.0, key=0)
        state = gs.init(jax.random.key(0), model, gs.GradSplitterConfig())
        masks = {k: jax.random.normal(jax.random.key(len(k)), v.shape) + 0.5 for k, v in state.masks.items()}
        x, y = jax.random.normal(jax.random.key(1), (64, 32, 32, 3)), jnp.arange(64) % 10
        args = (masks, state.heads, x, y)
        t = {"first": [], "plain": []}
        comp = {}
        for r in range(a.rounds):
            for name, pool in (("first", max_pool_2x2), ("plain", _pool)):
                cnn.max_pool_2x2 = pool  # the models call cnn.max_pool_2x2
                c, med, _, _ = time_jax(step_fn(model, default_chunk(10), 0.1), *args, reps=a.reps)
                comp.setdefault(name, c)
                t[name].append(med)
        cnn.max_pool_2x2 = max_pool_2x2
        f, pl = statistics.median(t["first"]), statistics.median(t["plain"])
        ratio = statistics.median([u / v for u, v in zip(t["first"], t["plain"])])
        rows.append({"model": arch, "first_max_s": f, "plain_s": pl, "ratio": ratio, "compile_s": comp})
        print(f"| {arch} | {f:.2f} | {pl:.2f} | {ratio:.3f} | {comp['first']:.1f} / {comp['plain']:.1f} |", flush=True)
    write_json(a.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
