"""Accelerator benchmark, one command: the GradSplitter modularization step, one CNNSplitter
generation, composition throughput and MwT's modular training step, JAX against the PyTorch baselines on the same device,
plus the device's peak memory of a 100-module GradSplitter step with and without remat.

    python benchmarks/bench_accelerator.py --out results/bench_accelerator.json [--quick]

Each part is the matching CPU benchmark's own function (``bench_gradsplitter.bench``,
``bench_cnnsplitter.bench``, ``bench_compose.bench``, ``bench_scale.one``, ``bench_mwt.bench``) run with its PyTorch
baseline on the accelerator PyTorch sees (``cuda``), so every ratio is same-device, same-run.
Where PyTorch sees no accelerator (a TPU host) the baseline is skipped and the JSON says so;
nothing falls back to the CPU silently. JAX must see an accelerator (``--allow-cpu`` to try
the script on a CPU). Rows are written to ``--out`` as they finish, so a run stopped at a
time limit keeps what it measured; ``--budget-s`` skips the parts that would start after it.
Timings: medians of ``--reps`` runs after a warm-up, compile apart; PyTorch synchronised
before every clock read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peaks are the step's, not the pool's

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
from common import environment, torch_enabled, write_json  # noqa: E402

import bench_cnnsplitter  # noqa: E402
import bench_compose  # noqa: E402
import bench_gradsplitter  # noqa: E402
import bench_mwt  # noqa: E402

#: (architecture, modules) of the GradSplitter rows: width 1, batch 64
GRAD = [("simcnn", 10), ("simcnn", 100), ("rescnn", 10), ("incecnn", 10)]
GA = ["simcnn", "rescnn"]
COMPOSE = [("simcnn", 256), ("rescnn", 256), ("simcnn", 2048)]
#: SimCNN widths of the MwT rows (batch 128, FC 512, the reference's)
MWT = [0.5, 1.0]
SCALE = [("simcnn", 100, "off"), ("simcnn", 100, "on"), ("rescnn", 100, "off"), ("rescnn", 100, "on")]


def torch_device() -> str | None:
    """``"cuda"`` when PyTorch sees a CUDA (or ROCm) device, else None."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def scale_row(arch: str, n: int, remat: str, batch: int, reps: int) -> dict:
    """bench_scale's one configuration in its own process (its own peak)."""
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "bench_scale.py"), "--one", "--arch", arch,
           "--n", str(n), "--remat", remat, "--batch", str(batch), "--reps", str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"arch": arch, "n": n, "remat": remat == "on", "error": out.stderr.strip()[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=["grad", "compose", "ga", "scale", "mwt"],
                   default=["grad", "compose", "mwt", "scale", "ga"])
    p.add_argument("--quick", action="store_true", help="one row per part (a first look, or a CPU trial)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no row after this many seconds (rows already measured are kept)")
    p.add_argument("--allow-cpu", action="store_true", help="run even when JAX sees only the CPU")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default="results/bench_accelerator.json")
    a = p.parse_args(argv)
    backend = jax.default_backend()
    if backend == "cpu" and not a.allow_cpu:
        raise SystemExit("bench_accelerator: JAX sees only the CPU (no GPU/TPU backend); "
                         "use the CPU benchmarks, or --allow-cpu to try this script")
    use_torch = torch_enabled(a.no_torch)
    tdev = (torch_device() or ("cpu" if backend == "cpu" else None)) if use_torch else None
    env = environment()
    env.update(jax_device_kind=jax.devices()[0].device_kind, torch_device=tdev)
    if use_torch and tdev and tdev != "cpu":
        import torch

        env["torch_device_name"] = torch.cuda.get_device_name(0)
    res = {"environment": env, "torch_baseline": tdev is not None,
           "note": None if tdev else "PyTorch sees no accelerator here: baselines skipped, JAX alone measured",
           "gradsplitter": [], "cnnsplitter": [], "compose": [], "mwt": [], "scale": [], "skipped": []}
    t0 = time.perf_counter()
    torch_on = tdev is not None

    def save():
        write_json(a.out, res)

    def due(part, what):
        if time.perf_counter() - t0 > a.budget_s:
            res["skipped"].append(f"{part} {what}: over --budget-s")
            return False
        return True

    grad = GRAD[:1] if a.quick else GRAD
    comp = COMPOSE[:1] if a.quick else COMPOSE
    ga = [("simcnn", 0.125, 20)] if a.quick else [(arch, 1.0, 100) for arch in GA]
    scale = [("simcnn", 10, "off"), ("simcnn", 10, "on")] if a.quick else SCALE
    for part in a.parts:
        if part == "grad":
            for arch, n in grad:
                if due(part, f"{arch} N={n}"):
                    r = bench_gradsplitter.bench(arch, 1.0, 64, n, a.reps, 1, 13000, torch_on, torch_device=tdev)
                    res["gradsplitter"].append(r)
                    print(f"grad {arch} N={n}: ours {r['mod_step_s'] * 1e3:.2f} ms/step, torch "
                          f"{1e3 * r.get('torch_mod_step_s', float('nan')):.2f} ms, compile {r['mod_compile_s']:.1f} s",
                          flush=True)
                    save()
        elif part == "compose":
            for arch, batch in comp:
                if due(part, f"{arch} batch {batch}"):
                    ms = bench_compose.synthetic_set(arch, 1.0, 0.55)
                    r = bench_compose.bench(ms, batch, a.reps, 1, torch_on, f"{arch} w1 keep 0.55", torch_device=tdev)
                    res["compose"].append(r)
                    print(f"compose {arch} batch {batch}: best {r['best']} {r[r['best'] + '_images_per_s']:.0f} img/s, "
                          f"torch {r.get('torch_loop_images_per_s', float('nan')):.0f} img/s", flush=True)
                    save()
        elif part == "ga":
            for arch, width, pop in ga:
                if due(part, arch):
                    r = bench_cnnsplitter.bench(arch, width, pop, 200, (0.5, 1.0), 20, torch_on, torch_device=tdev)
                    res["cnnsplitter"].append(r)
                    print(f"ga {arch}: generation {r['generation_s']:.2f} s, torch "
                          f"{r.get('torch_generation_s', float('nan')):.1f} s", flush=True)
                    save()
        elif part == "mwt":
            for width in (MWT[:1] if a.quick else MWT):
                if due(part, f"simcnn w{width:g}"):
                    r = bench_mwt.bench(width, 512, 128, a.reps, torch_on, torch_device=tdev or "cpu")
                    res["mwt"].append(r)
                    print(f"mwt simcnn w{width:g}: standard {1e3 * r['standard_step_s']:.2f} ms, MwT "
                          f"{1e3 * r['mwt_step_s']:.2f} ms, torch MwT {1e3 * r.get('torch_mwt_step_s', float('nan')):.2f} ms",
                          flush=True)
                    save()
            for arch in ("vgg16_bn", "resnet18"):  # the paper's models, width 1, JAX only
                if not a.quick and due(part, f"{arch} w1"):
                    r = bench_mwt.bench(1.0, 512, 128, a.reps, False, arch=arch)
                    res["mwt"].append(r)
                    print(f"mwt {arch} w1: standard {1e3 * r['standard_step_s']:.2f} ms, MwT "
                          f"{1e3 * r['mwt_step_s']:.2f} ms", flush=True)
                    save()
        elif part == "scale":
            for arch, n, remat in scale:
                if due(part, f"{arch} N={n} remat {remat}"):
                    r = scale_row(arch, n, remat, 64, 3)
                    res["scale"].append(r)
                    print(f"scale {arch} N={n} remat {remat}: {json.dumps(r)[:300]}", flush=True)
                    save()
    save()
    print(table(res))
    print(f"wrote {a.out}")
    return 0


def table(res) -> str:
    """Markdown tables of ``res`` (ratios: ours / PyTorch's time; < 1 = ours faster)."""
    nan = float("nan")
    env = res["environment"]
    out = [f"JAX {env['jax']} on {env['jax_device_kind']}; PyTorch {env.get('torch')} on "
           f"{env.get('torch_device_name') or env.get('torch_device')}", "",
           "| GradSplitter step (w1, batch 64) | N | ours ms | compile s | PyTorch ms | ours / PyTorch |",
           "|---|---|---|---|---|---|"]
    for r in res["gradsplitter"]:
        out.append(f"| {r['model']} | {r['modules']} | {1e3 * r['mod_step_s']:.2f} | {r['mod_compile_s']:.1f} | "
                   f"{1e3 * r.get('torch_mod_step_s', nan):.2f} | {r.get('mod_ratio', nan):.3f} |")
    out += ["", "| composition (10 modules, w1, keep 0.55) | batch | best | ours img/s | PyTorch loop img/s | "
            "PyTorch / ours time |", "|---|---|---|---|---|---|"]
    for r in res["compose"]:
        out.append(f"| {r['arch']} | {r['batch']} | {r['best']} | {r[r['best'] + '_images_per_s']:.0f} | "
                   f"{r.get('torch_loop_images_per_s', nan):.0f} | {r.get('torch_over_best', nan):.1f} |")
    out += ["", "| CNNSplitter generation (10 classes, 200 images) | population | ours s | PyTorch s (scaled) | ours / PyTorch |",
            "|---|---|---|---|---|"]
    for r in res["cnnsplitter"]:
        out.append(f"| {r['arch']} w{r['width']:g} | {r['population']} | {r['generation_s']:.2f} | {r.get('torch_generation_s', nan):.1f} | "
                   f"{r.get('ratio', nan):.4f} |")
    if res.get("mwt"):
        out += ["", "MwT training step (batch 128):", "", bench_mwt.table(res["mwt"])]
    out += ["", "| GradSplitter step at scale (w1, batch 64) | N | remat | step s | device peak GB | estimate GB |",
            "|---|---|---|---|---|---|"]
    for r in res["scale"]:
        if "error" in r:
            out.append(f"| {r['arch']} | {r['n']} | {r['remat']} | failed: {r['error'][-100:]} | | |")
        else:
            peak = r.get("peak_device_gb")
            out.append(f"| {r['arch']} | {r['n']} | {'on' if r['remat'] else 'off'} | {r['step_s']:.3f} | "
                       f"{peak if peak is None else f'{peak:.2f}'} | {r['estimate_gb']:.1f} |")
    if res["skipped"]:
        out += ["", "skipped: " + "; ".join(res["skipped"])]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
