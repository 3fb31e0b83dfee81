"""Several processes (hosts) as one program: JAX's multi-controller runtime, ``jax.distributed``.

Every process runs the same code on its own copy of the data; once ``initialize`` has joined
them, ``jax.devices()`` lists every process's devices, so the meshes of ``cnnsplit_jax.mesh``
span all hosts and nothing else changes for the caller. Three rules keep the processes in step:

* arrays that span processes reach the host through ``host`` (``process_allgather``, a
  collective that every process calls at the same point; plain ``np.asarray`` elsewhere);
* files are written by process 0 only (``is_primary``; ``checkpoint`` obeys it), and every
  write ends at a ``barrier``, so no process reads a file before it is complete;
* resuming needs the same process count (each process rebuilds the same state from the
  shared checkpoint directory).

``initialize`` takes its settings from arguments, else the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), else JAX's own
cluster detection (TPU pods, Slurm, Open MPI) when ``auto=True``. On the CPU the processes
talk through gloo (JAX's default CPU collectives).
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

__all__ = ["DistributedError", "settings", "initialize", "is_initialized", "process_index", "process_count",
           "is_primary", "barrier", "host"]

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


class DistributedError(ValueError):
    """Multi-process settings that cannot describe a run (missing, malformed or inconsistent)."""


def _int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def settings(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
             env: Mapping[str, str] | None = None) -> dict | None:
    """The run's multi-process settings: each argument, else its environment variable
    (``ENV``); None when neither names any. Checked: all three present, ``coordinator`` is
    ``HOST:PORT``, ``num_processes >= 1``, ``0 <= process_id < num_processes``.

    Raises ``DistributedError`` naming the missing or bad setting.
    """
    env = os.environ if env is None else env
    got = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    got = {k: (v if v is not None else env.get(ENV[k]) or None) for k, v in got.items()}
    if all(v is None for v in got.values()):
        return None
    missing = [f"{k} (--{k.replace('_', '-')} or {ENV[k]})" for k, v in got.items() if v is None]
    if missing:
        raise DistributedError("a multi-process run needs the coordinator address, the process count and this "
                               f"process's id; missing: {', '.join(missing)}")
    host, _, port = str(got["coordinator"]).rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator {got['coordinator']!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)")
    n, i = _int("num_processes", got["num_processes"]), _int("process_id", got["process_id"])
    if n < 1:
        raise DistributedError(f"num_processes={n}: at least 1")
    if not 0 <= i < n:
        raise DistributedError(f"process_id={i} is outside 0..{n - 1} (num_processes={n})")
    return {"coordinator": str(got["coordinator"]), "num_processes": n, "process_id": i}


def is_initialized() -> bool:
    """True once this process has joined a multi-process run."""
    from jax._src import distributed as _d  # JAX keeps the runtime's client there

    return _d.global_state.client is not None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False, timeout_s: int = 300) -> bool:
    """Join the multi-process run described by the arguments or the environment (``settings``),
    or found by JAX's cluster detection when ``auto`` (TPU, Slurm, Open MPI). Call it before
    any other JAX work. Returns True when this process is part of a run of several processes;
    False (nothing done) when no setting asks for one. A second call is a no-op.

    Raises ``DistributedError`` for incomplete or inconsistent settings.
    """
    if is_initialized():
        return jax.process_count() > 1
    s = settings(coordinator, num_processes, process_id)
    if s is None and not auto:
        return False
    if s is not None and s["num_processes"] == 1:
        return False
    kw = {} if s is None else {"coordinator_address": s["coordinator"], "num_processes": s["num_processes"],
                               "process_id": s["process_id"]}
    jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
    return jax.process_count() > 1


def process_index() -> int:
    """This process's index (0 on a single host)."""
    return jax.process_index()


def process_count() -> int:
    """Processes in the run (1 on a single host)."""
    return jax.process_count()


def is_primary() -> bool:
    """True on the one process that writes files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing on a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host(tree):
    """Every leaf as a NumPy array on this host: arrays spread over several processes are
    gathered whole (``process_allgather``, a collective: every process must call ``host`` on
    the same arrays in the same order); anything else goes through ``np.asarray``."""
    def get(v):
        if isinstance(v, jax.Array) and not v.is_fully_addressable and not v.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(v, tiled=True))
        return np.asarray(v)

    return jax.tree.map(get, tree)
