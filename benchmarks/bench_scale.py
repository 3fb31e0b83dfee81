"""GradSplitter at scale: time and peak memory of one modularization step for N modules,
with and without rematerialisation (``GradSplitterConfig.remat``).

    python benchmarks/bench_scale.py                       # SimCNN / ResCNN, N = 10, 20, 50
    python benchmarks/bench_scale.py --arch simcnn --n 100 --remat on
    python benchmarks/bench_scale.py --devices 1 8          # also on 8 simulated CPU devices

Each configuration runs in its own process, so its peak resident memory (``VmHWM``: weights,
compiled program and the step's buffers) is its own. The step is compiled first (compile time
reported apart), then timed ``--reps`` times with ``block_until_ready``; the median is
reported. One JSON line per configuration, then a markdown table. CPU figures are CPU
figures: on an accelerator the peak of interest is the device's (``memory_stats``), which the
same script reports when a GPU/TPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def one(arch: str, n: int, remat: bool, batch: int, reps: int, devices: int = 1) -> dict:
    import jax
    import jax.numpy as jnp

    import cnnsplit_jax as cs
    from cnnsplit_jax.splitters.gradsplitter import init, modularity_step
    from cnnsplit_jax.splitters.gradsplitter.memory import activation_bytes

    from cnnsplit_jax import mesh as meshlib
    from cnnsplit_jax.splitters.gradsplitter import place

    model = cs.build_model(arch, num_classes=n, in_channels=3, width=1.0, key=0)
    cfg = cs.GradSplitterConfig(init="random", remat=remat)
    mesh = meshlib.resolve(f"modules={devices}") if devices > 1 else None
    state = place(init(jax.random.key(0), model, cfg), mesh)
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    y = jnp.arange(batch) % n
    step = lambda s: modularity_step(model, cfg, s, x, y, mesh=mesh, n_real=n)  # noqa: E731
    t0 = time.perf_counter()
    state, _ = step(state)
    jax.block_until_ready(state.masks)
    first = time.perf_counter() - t0
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, _ = step(state)
        jax.block_until_ready(state.masks)
        runs.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    return {"arch": arch, "n": n, "remat": remat, "batch": batch, "device": dev.device_kind, "devices": devices,
            "step_s": statistics.median(runs), "compile_and_first_step_s": first,
            "peak_rss_gb": _peak_rss_bytes() / 1e9,
            "peak_device_gb": (stats or {}).get("peak_bytes_in_use", 0) / 1e9 if stats else None,
            "estimate_gb": activation_bytes(model, n, batch) / 1e9}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["simcnn", "rescnn"])
    p.add_argument("--n", nargs="+", type=int, default=[10, 20, 50])
    p.add_argument("--remat", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--devices", nargs="+", type=int, default=[1],
                   help="device counts: > 1 splits the modules over that many simulated CPU devices "
                        "(XLA_FLAGS=--xla_force_host_platform_device_count) or real ones")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.arch[0], a.n[0], a.remat[0] == "on", a.batch, a.reps, a.devices[0])))
        return 0
    rows = []
    for arch in a.arch:
        for n in a.n:
            for d in a.devices:
                for r in a.remat:
                    cmd = [sys.executable, __file__, "--one", "--arch", arch, "--n", str(n), "--remat", r,
                           "--batch", str(a.batch), "--reps", str(a.reps), "--devices", str(d)]
                    env = dict(os.environ)
                    if d > 1:  # simulated CPU devices (the flag does nothing to GPUs / TPUs)
                        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={d}".strip()
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if out.returncode:
                        rows.append({"arch": arch, "n": n, "devices": d, "remat": r == "on",
                                     "error": out.stderr.strip()[-300:]})
                    else:
                        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(json.dumps(rows[-1]), flush=True)
    print("\n| model | N | devices | remat | step (s) | compile + first step (s) | peak RSS (GB) | estimate (GB) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['arch']} w1 | {r['n']} | {r.get('devices', 1)} | {'on' if r['remat'] else 'off'} |"
        if "error" in r:
            print(f"{head} failed: {r['error'][-80:]} | | | |")
            continue
        print(f"{head} {r['step_s']:.2f} | {r['compile_and_first_step_s']:.1f} | {r['peak_rss_gb']:.2f} | "
              f"{r['estimate_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
