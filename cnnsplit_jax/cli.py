"""Command-line interface: ``cnnsplit train | info``.

Library modules never print; this module reports progress (tqdm bars, disabled when stderr
is not a terminal) and writes JSON results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty(), unit="step")


def _cmd_train(args) -> int:
    import jax

    from . import checkpoint as ckpt
    from .data import load_dataset
    from .models import build_model
    from .train import TrainConfig, accuracy, check_compatible, fit, summary

    out = Path(args.out)
    state_json = out / "train_state.json"
    if state_json.exists() and not args.resume:
        print(
            f"error: {out} already holds a training run; pass --resume to continue it or "
            f"choose another --out",
            file=sys.stderr,
        )
        return 2
    ds = load_dataset(args.dataset, args.data_dir)
    model = build_model(
        args.model,
        num_classes=ds.info.num_classes,
        in_channels=ds.info.channels,
        width=args.width,
        key=jax.random.key(args.seed),
        **({"fc_hidden": args.fc_hidden} if args.fc_hidden and args.model == "simcnn" else {}),
    )
    check_compatible(model, ds.info)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_milestones=tuple(args.lr_milestones),
        lr_gamma=args.lr_gamma,
        augment=args.augment,
        dirichlet_alpha=args.dirichlet_alpha,
        dirichlet_min_size=args.dirichlet_min_size,
        seed=args.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    counts = summary(model)
    print(
        f"training {args.model} (width {args.width}, {counts['num_kernels']} kernels, "
        f"{counts['num_params']:,} params) on {args.dataset} "
        f"({len(ds.y_train)} train / {len(ds.y_test)} test images) for {cfg.epochs} epochs",
        file=sys.stderr,
    )
    bar = {"b": None}

    def on_step(epoch, s, m):
        if bar["b"] is None:
            n = -(-int(len(ds.y_train) * (1 - cfg.val_fraction)) // cfg.batch_size)
            bar["b"] = _bar(n, f"epoch {epoch + 1}/{cfg.epochs}")
        bar["b"].update(1)
        bar["b"].set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}")

    def on_epoch(epoch, rec):
        if bar["b"] is not None:
            bar["b"].close()
            bar["b"] = None
        print(
            f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {rec['train_loss']:.4f}  "
            f"train acc {rec['train_accuracy']:.4f}  val acc {rec['val_accuracy']:.4f}  "
            f"[{rec['seconds']:.1f}s]",
            file=sys.stderr,
        )

    res = fit(model, ds, cfg, run_dir=out, resume=args.resume, on_step=on_step, on_epoch=on_epoch)
    t0 = time.perf_counter()
    test_acc = accuracy(res.model, ds.x_test, ds.y_test, ds.info)
    result = {
        "model": args.model,
        "dataset": args.dataset,
        "width": args.width,
        "num_classes": ds.info.num_classes,
        "in_channels": ds.info.channels,
        "num_kernels": counts["num_kernels"],
        "num_params": counts["num_params"],
        "test_accuracy": test_acc,
        "val_accuracy": res.best_val_accuracy,
        "best_epoch": res.best_epoch,
        "epochs": cfg.epochs,
        "train_seconds": res.train_seconds,
        "eval_seconds": time.perf_counter() - t0,
        "normalization": {"mean": list(ds.info.mean), "std": list(ds.info.std)},
        "class_names": list(ds.info.class_names),
        "seed": args.seed,
        "config": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "backend": jax.default_backend(),
    }
    ckpt.save_model(
        out,
        res.model,
        {
            "dataset": args.dataset,
            "normalization": result["normalization"],
            "class_names": result["class_names"],
            "test_accuracy": test_acc,
            "val_accuracy": res.best_val_accuracy,
            "seed": args.seed,
        },
    )
    ckpt.write_json(out / "train.json", result)
    print(f"test accuracy {test_acc:.4f}; wrote {out / 'train.json'}", file=sys.stderr)
    return 0


def _cmd_info(args) -> int:
    from . import checkpoint as ckpt
    from .masks import mask_points
    from .train import summary

    run = Path(args.run_dir)
    model, meta = ckpt.load_model(run)
    counts = summary(model)
    train = ckpt.read_json(run / "train.json") if (run / "train.json").is_file() else {}
    rows = [
        ("model", model.arch),
        ("width", model.width),
        ("classes", model.num_classes),
        ("input channels", model.in_channels),
        ("kernels", counts["num_kernels"]),
        ("parameters", f"{counts['num_params']:,}"),
        ("dataset", meta.get("dataset", "?")),
        ("test accuracy", meta.get("test_accuracy", "?")),
        ("train seconds", round(train["train_seconds"], 1) if "train_seconds" in train else "?"),
    ]
    for k, v in rows:
        print(f"{k:>16}: {v}")
    print(f"{'mask points':>16}: " + ", ".join(f"{p.name}[{p.size}]" + ("x" + str(len(p.layers)) if len(p.layers) > 1 else "") for p in mask_points(model)))
    if args.json:
        print(json.dumps({**meta, **counts}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import ARCHITECTURES

    p = argparse.ArgumentParser(prog="cnnsplit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a base model")
    t.add_argument("--model", required=True, choices=sorted(ARCHITECTURES))
    t.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)}")
    t.add_argument("--data-dir", default=None, help="where dataset files live (else $CNNSPLIT_DATA)")
    t.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    t.add_argument("--fc-hidden", type=int, default=None, help="SimCNN FC width (default 4096*width)")
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--lr-milestones", type=float, nargs="*", default=[0.3, 0.6],
                   help="fractions of the epochs at which lr is multiplied by --lr-gamma")
    t.add_argument("--lr-gamma", type=float, default=0.1)
    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=None,
                     help="flip + crop (default: on for 3-channel datasets)")
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    t.add_argument("--dirichlet-alpha", type=float, default=None,
                   help="train on the reference's non-IID Dirichlet subsample (seeded by --seed)")
    t.add_argument("--dirichlet-min-size", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("info", help="summarise a trained run directory")
    i.add_argument("run_dir")
    i.add_argument("--json", action="store_true", help="also print the metadata as JSON")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DatasetError

    try:
        return args.func(args)
    except (DatasetError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
