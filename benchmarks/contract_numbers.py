"""Pin the numbers of the CLI contract so a refactor can show it changed none of them.

Runs, through the CLI in a subprocess (``python -m cnnsplit_jax``, the tree on ``PYTHONPATH``):
the demo, then a round trip on the demo's base model: ``split --method ga`` (a short search),
``evaluate`` and a masked ``compose`` of both module sets,
``replace``, ``info``, and a small ResNet-20 through ``train`` + ``split --method concern`` +
``evaluate``. Every JSON the commands write is read back; keys that are timings or paths are
dropped; the rest is written to ``OUT/numbers.json`` (flattened ``file/key.path: value``).

    python benchmarks/contract_numbers.py --out /tmp/before          # on the old tree
    python benchmarks/contract_numbers.py --out /tmp/after --compare /tmp/before/numbers.json

``--compare`` prints every value that differs (exact equality for strings, ``--rtol`` for
floats) and exits 1 if any does, or if a key appeared or vanished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

VOLATILE = ("seconds", "time", "dir", "path", "out", "created", "version", "host", "device", "platform",
            "compile", "_s", "per_step", "throughput", "images_per", "energy")


def _cli(*args, cwd):
    cmd = [sys.executable, "-m", "cnnsplit_jax", *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def _flatten(obj, prefix, out, root: str):
    """``out[prefix.key.path] = value`` for every leaf of ``obj``; the run's own directory
    ``root`` reads ``OUT`` in keys and strings, so two runs in two directories compare."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if any(s in str(k).lower() for s in VOLATILE):
                continue
            _flatten(v, f"{prefix}.{str(k).replace(root, 'OUT')}", out, root)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out, root)
    else:
        out[prefix] = obj.replace(root, "OUT") if isinstance(obj, str) else obj


def run(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    _commands(out)
    return collect(out)


def _commands(out: Path) -> None:
    demo = out / "demo"
    _cli("demo", "--out", demo, cwd=out)
    base, grad = demo / "base", demo / "modules"
    rt = out / "roundtrip"
    _cli("split", "--method", "ga", "--model-dir", base, "--out", rt / "ga", "--population", 8, "--generations", 3,
         "--train-subset", 400, "--eval-images", 64, "--sensitivity-images", 64, "--seed", 1, cwd=out)
    for m in (grad, rt / "ga"):
        (rt / f"evaluate_{m.name}.txt").write_text(_cli("evaluate", m, cwd=out))
    for m in (grad, rt / "ga"):
        _cli("compose", "--modules", f"{m}:0-4", "--modules", f"{m}:5-9", "--form", "masked", "--baseline-epochs", 0,
             "--out", rt / f"compose_{m.name}", cwd=out)
    _cli("replace", "--help", cwd=out)
    _cli("train", "--model", "resnet20", "--dataset", "digits", "--width", 0.25, "--recipe", "quick", "--epochs", 2,
         "--out", rt / "resnet20", cwd=out)
    _cli("split", "--method", "concern", "--model-dir", rt / "resnet20", "--out", rt / "concern",
         "--concerned-per-class", 20, cwd=out)
    (rt / "evaluate_concern.txt").write_text(_cli("evaluate", rt / "concern", cwd=out))
    (rt / "info.txt").write_text(_cli("info", base, cwd=out))


def collect(out: Path) -> dict:
    """The flattened values of every JSON under ``out`` (written to ``out/numbers.json``)."""
    numbers = {}
    for f in sorted(out.rglob("*.json")):
        if f.name == "numbers.json" or "ckpt" in f.parts or f.parent.name.startswith("."):
            continue
        try:
            _flatten(json.loads(f.read_text()), str(f.relative_to(out)), numbers, str(out))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1, sort_keys=True))
    return numbers


def compare(now: dict, then: dict, rtol: float) -> list[str]:
    diffs = [f"only before: {k}" for k in sorted(set(then) - set(now))]
    diffs += [f"only after: {k}" for k in sorted(set(now) - set(then))]
    for k in sorted(set(now) & set(then)):
        a, b = then[k], now[k]
        if isinstance(a, float) and isinstance(b, float):
            same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)
        else:
            same = a == b
        if not same:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="numbers.json of an earlier run")
    ap.add_argument("--rtol", type=float, default=0.0)
    ap.add_argument("--collect-only", action="store_true", help="re-read the JSON of an earlier run in --out")
    a = ap.parse_args(argv)
    numbers = collect(a.out) if a.collect_only else run(a.out)
    print(f"{len(numbers)} values -> {a.out / 'numbers.json'}")
    if a.compare:
        diffs = compare(numbers, json.loads(a.compare.read_text()), a.rtol)
        print("\n".join(diffs) if diffs else f"all {len(numbers)} values equal")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
