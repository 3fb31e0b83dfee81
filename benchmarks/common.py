"""Timing helpers shared by the benchmarks (compile apart, medians of block_until_ready runs)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def time_jax(fn, *args, reps: int = 5, warmup: int = 1):
    """Compile ``jax.jit(fn)`` for ``args``; return (compile_s, median_run_s, gflop, all_runs)."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t)
    return compile_s, statistics.median(runs), flops / 1e9, runs


def time_torch(fn, reps: int = 5, warmup: int = 1, device: str = "cpu"):
    """Median wall time of ``fn()`` (PyTorch, eager) after ``warmup`` calls; on a CUDA
    ``device`` the queue is drained (``torch.cuda.synchronize``) before each clock read."""
    sync = torch_sync(device)
    for _ in range(warmup):
        fn()
    sync()
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), runs


def torch_sync(device: str = "cpu"):
    """A function that waits for ``device``'s queued PyTorch work (a no-op on the CPU)."""
    if not str(device).startswith("cuda"):
        return lambda: None
    import torch

    return torch.cuda.synchronize


def torch_enabled(no_torch: bool) -> bool:
    """True when PyTorch is importable and not disabled; uses every core, like XLA."""
    if no_torch:
        return False
    try:
        import torch
    except ImportError:
        return False
    torch.set_num_threads(os.cpu_count() or 1)
    return True


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    info = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
