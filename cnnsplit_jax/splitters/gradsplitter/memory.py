"""How much a modularization step keeps for its backward pass, and when to rematerialise.

A GradSplitter step runs N masked copies of the model on one batch and keeps every copy's
activations for the backward pass, so its memory grows linearly with N (measured on the CPU:
a 100-class SimCNN at width 1, batch 64, 17.9 GB peak). With ``remat`` each vmapped group of
modules (``module_chunk``) recomputes its activations in the backward pass
(``jax.checkpoint``): the step keeps one group's activations at a time, for a second forward.
"""

from __future__ import annotations

import os

import jax

__all__ = ["activation_bytes", "memory_budget", "use_remat"]

#: float32 values a step holds per conv output position, module and image. Three are kept for
#: the backward pass (the conv's output, its normalisation's, the masked activation); the rest
#: is the backward pass's own working set. Set from the largest measured peak per estimated
#: position: a GPU step without remat peaks at 1.39-1.53x three values per position
#: (NVIDIA H200, batch 64: SimCNN w1 N = 50 / 100 at 16.2 / 31.1 GB, ResCNN w1 at 20.8 / 41.3
#: GB); the CPU at 0.84x (SimCNN N = 100: 17.9 GB RSS).
KEPT_PER_POSITION = 5


def activation_bytes(model, n: int, batch: int) -> int:
    """Estimated peak bytes of a step's activations for N modules on ``batch`` images:
    ``N x batch x sum over convs (output H x W x channels) x KEPT_PER_POSITION x 4``
    (float32). For SimCNN at width 1: 5.5 MB per image and module, 35 GB for N = 100 at batch
    64, against 31.1 GB measured on an H200 and 17.9 GB on the CPU."""
    per = 0
    for s in model.topology:
        h = s.out_spatial
        per += h * h * s.out_channels
    return int(n * batch * per * KEPT_PER_POSITION * 4)


def memory_budget() -> int:
    """Bytes a step may use: 80% of the first device's memory on GPU/TPU, half the host's
    physical memory on the CPU."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" and hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(0.8 * stats["bytes_limit"])
    return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def use_remat(remat: bool | None, model, n: int, batch: int, budget: int | None = None) -> bool:
    """``remat`` when given; else True when ``activation_bytes`` exceeds ``budget``
    (default ``memory_budget()``)."""
    if remat is not None:
        return bool(remat)
    return activation_bytes(model, n, batch) > (memory_budget() if budget is None else budget)
