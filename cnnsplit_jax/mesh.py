"""Device meshes: the one option (``mesh=`` in the API, ``--mesh AXIS=SIZE[,AXIS=SIZE]`` on the
command line) that spreads a search or a composition over devices with ``jax.sharding``.

Axes, by what they split:

* ``modules``: the module axis (GradSplitter's masks, heads and their Adam state; CNNSplitter's
  class x individual axis);
* ``data``: the image batch (GradSplitter steps, composition, data-parallel training, and
  concern identification's forward batches, the one axis it takes).

A spec names each axis once with its size, and the sizes multiply to the number of devices
(every device is used, none twice). ``None`` or ``"auto"`` puts all devices on the entry
point's natural axis; with one device that is today's single-device behaviour. Module counts
that do not divide the ``modules`` axis are padded by the callers (``padded``) and the padding
is sliced off before anything is reported.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "MeshError", "parse_mesh", "make_mesh", "resolve", "resolve_data", "axis_size", "padded", "pad_rows",
           "put", "shard_rows", "shard_batch", "replicate", "describe", "map_blocks"]

AXES = ("modules", "data")


class MeshError(ValueError):
    """A mesh specification that cannot be built on the devices present."""


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,modules=4"`` -> ``{"data": 2, "modules": 4}`` (order kept; checked syntax)."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in str(spec).split(",")):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or not name or not size.strip().lstrip("-").isdigit():
            raise MeshError(f"mesh spec {spec!r}: expected AXIS=SIZE[,AXIS=SIZE] (e.g. 'modules=8' or "
                            f"'data=2,modules=4'); could not read {part!r}")
        if name in out:
            raise MeshError(f"mesh spec {spec!r}: axis {name!r} given twice")
        out[name] = int(size)
    return out


def make_mesh(spec: str | Mapping[str, int] | Mesh | None = None, *, natural: str = "modules",
              allowed: tuple[str, ...] = AXES, devices=None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all of ``jax.devices()``).

    spec: ``None`` / ``"auto"``: every device on ``natural``; ``"AXIS=SIZE,..."`` or a mapping;
    or a ``Mesh`` (checked and returned). Raises ``MeshError`` for an axis outside ``allowed``,
    a size below 1, more devices than exist, or sizes that do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, Mesh):
        unknown = [a for a in spec.axis_names if a not in allowed]
        if unknown:
            raise MeshError(f"mesh axis {unknown[0]!r} is not one this entry point splits; use {', '.join(allowed)}")
        return spec
    if spec is None or spec == "auto":
        sizes = {natural: len(devices)}
    else:
        sizes = parse_mesh(spec) if isinstance(spec, str) else {str(k): int(v) for k, v in dict(spec).items()}
    for name, size in sizes.items():
        if name not in allowed:
            raise MeshError(f"unknown mesh axis {name!r}: this entry point splits {', '.join(allowed)}")
        if size < 1:
            raise MeshError(f"mesh axis {name}={size}: sizes are at least 1")
    total = int(np.prod(list(sizes.values())))
    if total > len(devices):
        raise MeshError(f"mesh {_fmt(sizes)} needs {total} devices; only {len(devices)} exist "
                        f"({devices[0].platform})")
    if total != len(devices):
        raise MeshError(f"mesh {_fmt(sizes)} uses {total} of the {len(devices)} devices: the axis sizes must "
                        f"multiply to the device count (e.g. {natural}={len(devices)})")
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


def resolve(spec=None, *, natural: str = "modules", allowed: tuple[str, ...] = AXES) -> Mesh | None:
    """``make_mesh(spec)``, or None when it holds a single device (then every entry point runs
    its unsharded code: today's single-device behaviour, exactly)."""
    mesh = make_mesh(spec, natural=natural, allowed=allowed)
    return None if mesh.devices.size == 1 else mesh


def resolve_data(spec=None) -> Mesh | None:
    """``resolve`` for the entry points that split only the image batch (composition,
    evaluation, training, concern identification): axis ``data``, all devices by default."""
    return resolve(spec, natural="data", allowed=("data",))


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def describe(mesh: Mesh | None) -> str:
    """``"modules=8"``-style text of ``mesh`` (``"1 device"`` for None)."""
    return "1 device" if mesh is None else _fmt(dict(mesh.shape))


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Devices along ``axis`` (1 when the mesh is None or lacks the axis)."""
    return 1 if mesh is None or axis not in mesh.shape else int(mesh.shape[axis])


def padded(n: int, mesh: Mesh | None, axis: str = "modules", multiple: int = 1) -> int:
    """``n`` rounded up to a multiple of ``axis_size(mesh, axis) * multiple``."""
    m = axis_size(mesh, axis) * max(1, int(multiple))
    return -(-n // m) * m


def pad_rows(tree, n_to: int):
    """Every leaf's leading axis padded to ``n_to`` with copies of its first row (real values,
    never NaN or garbage; callers slice the padding off)."""

    def pad(v):
        v = jax.numpy.asarray(v)
        extra = n_to - v.shape[0]
        return v if extra <= 0 else jax.numpy.concatenate([v, jax.numpy.repeat(v[:1], extra, 0)])

    return jax.tree.map(pad, tree)


def put(v, sharding: NamedSharding) -> jax.Array:
    """``v`` (array, NumPy array or PRNG key array) placed with ``sharding``. In a run of several
    processes the mesh spans devices this process cannot address: a local array then goes
    through the host (every process holds the same value) and an array already spread over
    the processes is resharded."""
    if jax.process_count() == 1:
        return jax.device_put(jax.numpy.asarray(v), sharding)
    if isinstance(v, jax.Array) and jax.numpy.issubdtype(v.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(v), sharding), impl=jax.random.key_impl(v))
    if isinstance(v, jax.Array) and not v.is_fully_addressable:
        return jax.device_put(v, sharding)
    return jax.device_put(np.asarray(v), sharding)


def shard_rows(tree, mesh: Mesh | None, axis: str = "modules"):
    """Leaves with a leading axis put on ``mesh`` split along ``axis`` (scalars replicated);
    the tree unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda v: put(v, NamedSharding(mesh, P(axis) if np.ndim(v) and axis in mesh.shape
                                                       else P())), tree)


def shard_batch(tree, mesh: Mesh | None):
    """Leaves split along their leading (batch) axis over the mesh's ``data`` axis when it
    divides, else replicated (an odd batch runs whole on every device: same result); the tree
    unchanged without a mesh."""
    if mesh is None:
        return tree
    d = axis_size(mesh, "data")
    return jax.tree.map(lambda v: put(v, NamedSharding(mesh, P("data") if d > 1 and np.shape(v)[0] % d == 0
                                                       else P())), tree)


def map_blocks(f, tree, shards: int, chunk: int | None):
    """``f`` over a module axis (every leaf's leading axis, N) split in ``shards`` contiguous
    device blocks of L = N / shards: one call (chunk None), or ``lax.map`` over L / g steps,
    each taking g modules from every block (g: the largest divisor of L not above ``chunk``),
    so no step's modules cross devices. Returns ``f``'s output [N, ...] in module order."""
    n = jax.tree.leaves(tree)[0].shape[0]
    if n % shards:
        raise ValueError(f"{n} modules do not split over {shards} devices: pad them first (mesh.padded)")
    local = n // shards
    if chunk is None or chunk >= local:
        return f(tree)
    g = max(d for d in range(1, min(chunk, local) + 1) if local % d == 0)
    steps = local // g
    groups = jax.tree.map(lambda v: v.reshape(shards, steps, g, *v.shape[1:]).swapaxes(0, 1)
                          .reshape(steps, shards * g, *v.shape[1:]), tree)
    out = jax.lax.map(f, groups)  # [steps, shards * g, ...]
    rest = out.shape[2:]
    return out.reshape(steps, shards, g, *rest).swapaxes(0, 1).reshape(n, *rest)


def replicate(tree, mesh: Mesh | None):
    """Every leaf replicated on ``mesh`` (unchanged without one)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda v: put(v, NamedSharding(mesh, P())), tree)
