"""The ``cnnsplit`` argument parser. Every flag that sets a config field is declared with
``config_flag``: its argparse default is None ("not given") and its help text shows the
config dataclass's default (and the presets' values), so each default lives once, in
``TrainConfig`` / ``MwTConfig`` / ``GradSplitterConfig`` / ``CNNSplitterConfig`` /
``ConcernConfig`` / ``MwTSplitConfig``;
``config_from`` builds the config from a preset and the given flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from ..data import DATASETS
from ..models import ARCHITECTURES
from ..pipeline import DemoConfig
from ..splitters import METHODS, CNNSplitterConfig, ConcernConfig, GradSplitterConfig
from ..splitters.cnnsplitter import PRESETS as GA_PRESETS
from ..splitters.gradsplitter import PRESETS
from ..splitters.mwt import SUBTASK_RECIPE, MwTConfig, MwTSplitConfig
from ..splitters.registry import trainers
from ..train import RECIPES, TrainConfig

__all__ = ["build_parser", "config_from", "given_flags", "CONFIG_FLAGS"]

#: (config class, field) of every flag declared with ``config_flag``, by its dest
CONFIG_FLAGS: dict[str, list[tuple[type, str]]] = {}

def _default(cls, field: str):
    f = {x.name: x for x in dataclasses.fields(cls)}[field]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v)) if v else "none"
    return str(v)


def _alpha(text: str):
    """``--dirichlet-alpha``: ``auto`` or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def config_flag(group, cls, field: str, help: str, *, flag: str | None = None, presets: dict | None = None,
                **kw) -> None:
    """Declare ``--field`` for ``cls.field``: default None (not given); help shows the
    dataclass default and every preset that sets it."""
    hint = typing.get_type_hints(cls)[field]
    if typing.get_origin(hint) is typing.Literal and "choices" not in kw:
        kw["choices"] = list(typing.get_args(hint))
    note = f"default {_fmt(_default(cls, field))}"
    if presets:
        note += "".join(f"; {name}: {_fmt(v[field])}" for name, v in presets.items() if field in v)
    action = group.add_argument(flag or f"--{field.replace('_', '-')}", dest=field, default=None,
                                help=f"{help} ({note})", **kw)
    action.config_field = (cls, field)
    CONFIG_FLAGS.setdefault(field, []).append((cls, field))


def given_flags(args: argparse.Namespace, fields) -> dict:
    """The flags among ``fields`` given on the command line, as config values (``none`` ->
    None)."""
    values = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return {k: None if v is NONE_GIVEN else v for k, v in values.items()}


def config_from(cls, args: argparse.Namespace, fields, preset: dict | None = None, **fixed):
    """``cls(**{**preset, **given flags among fields, **fixed})``."""
    return cls(**{**(preset or {}), **given_flags(args, fields), **fixed})


class _NoneGiven:
    """``--flag none``: the config field set to None (a flag left out keeps the default)."""

    def __repr__(self):
        return "none"


NONE_GIVEN = _NoneGiven()


def _optional(conv):
    def parse(s: str):
        return NONE_GIVEN if s.strip().lower() == "none" else conv(s)
    parse.__name__ = conv.__name__
    return parse


def _names(s: str) -> tuple[str, ...]:
    return tuple(x for x in s.split(",") if x)


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v)


def _thresholds(s: str) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(a), float(b)) for a, b in (item.split(":") for item in s.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE:ACCURACY,... (e.g. 2:.95,4:.95,8:.85,10:.8), got {s!r}")


def _mesh_flag(parser, natural: str, what: str) -> None:
    parser.add_argument("--mesh", default=None, metavar="AXIS=SIZE[,AXIS=SIZE]",
                        help=f"device mesh: {what} (default: every device on '{natural}'; "
                             "e.g. --mesh modules=8, --mesh data=2,modules=4)")


def _train_parser(sub, common) -> None:
    t = sub.add_parser("train", parents=[common], help="train a base model")
    start = t.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", choices=sorted(ARCHITECTURES), help="a zoo architecture, trained from scratch")
    start.add_argument("--init-from", default=None, metavar="RUN",
                       help="or train the model of this run directory from its weights: your own model made into "
                            "a run by `cnnsplit adapt` (with --trust-definition), e.g. with --method mwt")
    t.add_argument("--dataset", default=None,
                   help=f"one of {sorted(DATASETS)}, or a task NAME:CLASSES[+NAME:CLASSES] "
                        "(e.g. digits:0-8 or fashion_mnist:0,1+digits:3); labels follow the order given "
                        "(required with --model; with --init-from, default: the run's)")
    t.add_argument("--data-dir", default=None, help="where dataset files live (default: $CNNSPLIT_DATA)")
    t.add_argument("--width", type=float, default=None, help="channel multiplier (default 1 = the papers')")
    t.add_argument("--fc-hidden", type=int, default=None, help="SimCNN FC width (default 4096*width)")
    t.add_argument("--method", default="standard", choices=["standard", *(m.name for m in trainers())],
                   help="standard: cross-entropy; or train for a method that trains its own model, "
                        + "; ".join(f"{m.name}: {m.title}" for m in trainers())
                        + " (mask generators trained with the model, cross-entropy + cohesion + coupling); split "
                        "such a run with the same --method (default standard)")
    t.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="hyper-parameter preset (default: reference, resnet for resnet20/32/56, mwt for --method "
                        "mwt): the papers' training; quick: a short run for small data (the demo's); weak / "
                        "poor-fit: CNNSplitter's patching models; resnet: Adam 1e-3 as Pan & Rajan's Keras "
                        "models; mwt: MwT's (SGD Nesterov 0.05, cosine, 200 epochs); mwt-quick: that over 12 "
                        "epochs. The flags below override it")
    g = t.add_argument_group("training (TrainConfig)")
    for field, kind, help_ in (("epochs", int, "epochs"), ("batch_size", int, "images per step"),
                               ("lr", float, "learning rate"), ("momentum", float, "SGD momentum"),
                               ("weight_decay", float, "coupled weight decay"),
                               ("lr_gamma", float, "lr factor at each milestone"),
                               ("patience", int, "stop after this many epochs without a better validation "
                                                 "accuracy (0: off)")):
        config_flag(g, TrainConfig, field, help_, presets=RECIPES, type=kind)
    config_flag(g, TrainConfig, "lr_milestones", "fractions of the epochs at which lr is multiplied by "
                "--lr-gamma", presets=RECIPES, type=float, nargs="*")
    config_flag(g, TrainConfig, "lr_schedule", "step: --lr-milestones; cosine: annealed once per epoch over "
                "--epochs (needs --lr-milestones with no value)", presets=RECIPES)
    config_flag(g, TrainConfig, "nesterov", "Nesterov momentum (SGD)", presets=RECIPES, action="store_true")
    aug = g.add_mutually_exclusive_group()
    config_flag(aug, TrainConfig, "augment", "flip + crop (None: on for 3-channel datasets)", presets=RECIPES,
                action="store_true")
    aug.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="no augmentation")
    config_flag(g, TrainConfig, "augment_val", "pick the best epoch on a flip + crop augmented copy of the "
                "validation split, redrawn each epoch, as GradSplitter's base training", action="store_true")
    config_flag(g, TrainConfig, "dirichlet_alpha", "train on the reference's non-IID Dirichlet subsample "
                "(seeded by --seed) with this concentration, or 'auto': the dataset's (GradSplitter's "
                "estimators: SVHN 0.5, CIFAR-10 and others 1)", type=_alpha)
    config_flag(g, TrainConfig, "dirichlet_min_size", "minimum images per class of that subsample (none: the "
                "dataset's, SVHN 10, others 100)", type=int)
    config_flag(g, TrainConfig, "train_images", "train on at most this many images: the first of the seeded, "
                "shuffled training part (a CPU-sized run); the validation part is unchanged", type=int)
    config_flag(g, TrainConfig, "split_scheme", "train / validation split: seeded by --seed, or CNNSplitter's "
                "(seed 1009, int(0.8 n)), whose validation part is CNNSplitter's search data")
    config_flag(g, TrainConfig, "seed", "seed of the model init, split and shuffles", type=int)
    mg = t.add_argument_group("MwT's modular loss (--method mwt)")
    config_flag(mg, MwTConfig, "alpha", "weight of the cohesion loss", type=float)
    config_flag(mg, MwTConfig, "beta", "weight of the coupling loss", type=float)
    t.add_argument("--out", required=True, help="run directory")
    _mesh_flag(t, "data", "data-parallel training: each batch split over the devices")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def _shape(s: str) -> tuple[int, int, int]:
    try:
        h, w, c = (int(v) for v in s.split(","))
        return h, w, c
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W,C (e.g. 28,28,1), got {s!r}")


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object (e.g. '{{\"train\": false}}'): {e}")
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def _adapt_parser(sub, common) -> None:
    a = sub.add_parser("adapt", parents=[common], help="make a run directory of your own trained Flax model (NNX or "
                       "Linen) that split, evaluate and compose take")
    a.add_argument("--definition", required=True, metavar="PACKAGE.MODULE:NAME",
                   help="a callable with no arguments returning the model (an NNX module, or a Linen module); "
                        "its package must be importable (PYTHONPATH)")
    a.add_argument("--variables", default=None, help="trained variables: a Flax msgpack file or an Orbax directory "
                   "(required for Linen; NNX default: the definition's own weights)")
    a.add_argument("--dataset", required=True, help="the dataset (or task spec) the model classifies")
    a.add_argument("--data-dir", default=None)
    a.add_argument("--input-shape", type=_shape, default=None, metavar="H,W,C",
                   help="what the model reads (default: the dataset's 32,32,C; smaller: centre crops)")
    a.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel normalisation the model was "
                   "trained with, on the [0, 1] scale (default: the dataset's)")
    a.add_argument("--std", type=float, nargs="+", default=None)
    a.add_argument("--apply-kwargs", type=_json_object, default=None, metavar="JSON",
                   help='keyword arguments of every call, e.g. \'{"train": false}\'')
    a.add_argument("--train-kwargs", type=_json_object, default=None, metavar="JSON",
                   help='Linen: keyword arguments of the training forward, e.g. \'{"train": true}\', for fine-tuning '
                        "it here (cnnsplit subtask) when it has BatchNorm")
    a.add_argument("--kind", default="kernel", choices=("kernel", "node"),
                   help="kernel: for --method grad / ga; node: for --method concern (default kernel)")
    a.add_argument("--ties", default="auto", choices=("auto", "none"),
                   help="auto: convs added by residual sums share one mask, found in the traced graph (default)")
    a.add_argument("--seed", type=int, default=0, help="seed of the train / validation split the splitters use")
    a.add_argument("--out", required=True, help="run directory")
    a.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def _mwt_split_flags(sp) -> None:
    mw = sp.add_argument_group("MwT (--method mwt: a run of `cnnsplit train --method mwt`)")
    config_flag(mw, MwTSplitConfig, "threshold", "a module keeps the kernels active for at least this fraction of "
                "its class's training images", type=float)
    config_flag(mw, MwTSplitConfig, "step", "how far a layer's threshold is lowered when it would keep no kernel",
                type=float)


def _split_parser(sub, common) -> None:
    sp = sub.add_parser("split", parents=[common], help="decompose a trained model into per-class modules")
    sp.add_argument("--method", default="grad", choices=sorted(METHODS),
                    help="; ".join(f"{m.name}: {m.title}" + (" (ResNets)" if m.model_kind == "node" else "")
                                   for m in METHODS.values()) + " (default grad)")
    sp.add_argument("--model-dir", required=True, help="run directory of `cnnsplit train`")
    sp.add_argument("--out", required=True, help="module-set directory")
    _mesh_flag(sp, "modules", "modules (grad) or class x individual modules (ga) split over the devices, "
               "axes modules, data; concern: its images, axis data")
    sp.add_argument("--resume", action="store_true", help="continue the search in --out")
    sp.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    sp.add_argument("--train-subset", type=int, default=None,
                    help="use only the first N images of the training split (CPU budgets; default all)")
    config_flag(sp, GradSplitterConfig, "seed", "seed of the search", type=int)
    sp.add_argument("--recipe", default=None, choices=sorted({n for m in METHODS.values() for n in m.presets} | {"auto"}),
                    help="preset of the method's settings (the flags below override it). grad: reference "
                         "(default) or quick, a short run that removes kernels in a few hundred steps (the "
                         "demo's). ga: auto (default: the reference's configuration for the model and dataset, "
                         f"when it has one: {', '.join(n for n in GA_PRESETS if n != 'narrow')}), one of those, "
                         "or narrow (raised initial ratios and a CPU budget for narrow models)")
    gs = sp.add_argument_group("GradSplitter (--method grad)")
    for field, kind, help_ in (("alpha", float, "weight of the kept-kernel term"),
                               ("head_epochs", int, "leading head-only epochs"),
                               ("modularity_epochs", int, "epochs in whole cycles of 5 modularization + 2 head "
                                                          "epochs (rounded up)"),
                               ("lr_head", float, "Adam lr of head phases"),
                               ("lr_modularity", float, "Adam lr of modularization phases"),
                               ("batch_size", int, "images per step"),
                               ("select_tolerance", float, "accuracy loss allowed when choosing the epoch with "
                                                           "the fewest kernels")):
        config_flag(gs, GradSplitterConfig, field, help_, presets=PRESETS, type=kind)
    config_flag(gs, GradSplitterConfig, "init", "initial masks")
    cc = sp.add_argument_group("concern identification (--method concern, ResNets)")
    config_flag(cc, ConcernConfig, "negative_ratio", "negative inputs per concerned input for tangling "
                "identification", type=float)
    config_flag(cc, ConcernConfig, "backtrack", "bln: backtrack to the last conv layer (MC-BLN); bi: MC-BLN, then "
                "back to the input as Algorithm 3 (MC-BI: per conv, its own outputs; changes the output); "
                "bi_preserving: an MC-BI that also consults the shortcuts (output unchanged); none: CI+TI+MC")
    config_flag(cc, ConcernConfig, "residual", "conv: maps for conv outputs only, conv2's output and a projection "
                "shortcut's masked before each Add (the paper's mapping); conv_identity: the identity input masked "
                "too; sum: mask the sum at its ReLU (exact on concerned inputs)")
    config_flag(cc, ConcernConfig, "delta", "MC-BLN's strong-edge threshold", type=float)
    config_flag(cc, ConcernConfig, "bln_rule", "listing: Algorithm 2 as printed, remove feature i when "
                "W[i,V_uc] <= -delta and W[i,V_c] >= delta; readings of the prose (a strong V_uc edge, a V_c edge "
                "that is not): absolute: strong when w > delta; negative: w < -delta; relative: |w| >= delta x "
                "the column's largest |w|")
    config_flag(cc, ConcernConfig, "concerned_per_class", "class-c training inputs used per module (none: all)",
                type=_optional(int))
    config_flag(cc, ConcernConfig, "min_confidence", "only inputs the model predicts as their class above this "
                "softmax probability are concerned inputs (none: no filter)", type=_optional(float))
    config_flag(cc, ConcernConfig, "unconfident", "a class with no input above --min-confidence: fallback to its "
                "unfiltered inputs (warned, listed in split.json) or refuse")
    _mwt_split_flags(sp)
    ga = sp.add_argument_group("CNNSplitter (--method ga)")
    for field, kind, help_ in (("population", int, "individuals per class"), ("generations", int, "generations"),
                               ("groups", int, "genes per layer (None: 10 below 256 kernels, else 100)"),
                               ("eval_images", int, "search images used for fitness (None or 0: all)"),
                               ("sensitivity_images", int, "search images of the sensitivity analysis (None or "
                                                           "0: all)"),
                               ("early_stop", int, "stop after N generations without improvement (None or 0: "
                                                   "off)")):
        config_flag(ga, CNNSplitterConfig, field, help_, type=kind)
    config_flag(ga, CNNSplitterConfig, "mutation_percent", "percent of genes set at random",
                flag="--mutation-rate", type=float)
    config_flag(ga, CNNSplitterConfig, "sensitive", "comma-separated sensitive mask points (None: the "
                "automatic sensitivity rule)", type=_names)
    config_flag(ga, CNNSplitterConfig, "algorithm", "simple_ga: evosax's stock SimpleGA on a thresholded "
                "genome (fast; not the paper's GA)")
    config_flag(ga, CNNSplitterConfig, "sensitive_ratios", "initial kept-group ratios of sensitive layers",
                type=_floats)
    config_flag(ga, CNNSplitterConfig, "other_ratios", "initial kept-group ratios of other layers", type=_floats)
    config_flag(ga, CNNSplitterConfig, "thresholds", "the joint fitness's accuracy thresholds per composition size, "
                "SIZE:ACC,... (None: the reference's for the class count)", type=_thresholds)
    config_flag(ga, CNNSplitterConfig, "importance_data", "kernel-importance images: the search split, or the "
                "reference's (per class, the held-out 20%% of its training images after a seed-1009 shuffle)")
    config_flag(ga, CNNSplitterConfig, "shared_initial_population", "False: draw each class's initial population "
                "on its own (the reference: one draw for all classes)", flag="--per-class-initial-population",
                action="store_false")


def _reuse_parsers(sub, common) -> None:
    mods_help = ("module-set directory, optionally with the classes it may contribute: MOD_DIR[:0,2,5-7] "
                 "(repeat the flag; where several cover a class, the best-F1 module wins)")
    c = sub.add_parser("compose", parents=[common], help="compose modules of one or more module sets into a classifier")
    c.add_argument("--modules", action="append", required=True, help=mods_help)
    c.add_argument("--dataset", default=None,
                   help="evaluate on this dataset or task spec (default: every class the modules cover)")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--form", default="masked", choices=["masked", "extracted"], help="(default masked)")
    c.add_argument("--execution", default="auto", choices=["auto", "vmap", "unrolled"], help="(default auto)")
    c.add_argument("--baseline-epochs", type=int, default=0,
                   help="also train the same architecture from scratch on the task (new-task scenario; default 0)")
    c.add_argument("--seed", type=int, default=0, help="(default 0)")
    c.add_argument("--continuous-learning", action="store_true",
                   help="concern modules: also report the composition after re-running tangling "
                        "identification against the other datasets' classes (Pan & Rajan)")
    c.add_argument("--out", required=True)
    _mesh_flag(c, "data", "each batch of images split over the devices")
    c.add_argument("--overwrite", action="store_true", help="replace what --out holds")

    pa = sub.add_parser("patch", parents=[common], help="patch a weak model's target class with a module")
    pa.add_argument("--weak", required=True, help="run directory of the weak model (target class last)")
    pa.add_argument("--modules", required=True, help="module-set directory")
    pa.add_argument("--target-class", required=True, type=int, help="module index of the target class")
    pa.add_argument("--data-dir", default=None)
    pa.add_argument("--out", required=True)
    _mesh_flag(pa, "data", "each batch of images the module scores split over the devices")
    pa.add_argument("--overwrite", action="store_true", help="replace what --out holds")

    r = sub.add_parser("replace", parents=[common], help="swap one class's module for another model's")
    r.add_argument("--modules", action="append", required=True, help=mods_help)
    r.add_argument("--with", dest="with_", required=True, help="module set providing the new module")
    r.add_argument("--class", dest="class_", required=True, type=int, help="module index in --with")
    r.add_argument("--dataset", default=None)
    r.add_argument("--data-dir", default=None)
    r.add_argument("--form", default="masked", choices=["masked", "extracted"], help="(default masked)")
    r.add_argument("--execution", default="auto", choices=["auto", "vmap", "unrolled"], help="(default auto)")
    r.add_argument("--out", required=True)
    _mesh_flag(r, "data", "each batch of images split over the devices")
    r.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def _subtask_parser(sub, common) -> None:
    st = sub.add_parser("subtask", aliases=["reuse"], parents=[common],
                        help="MwT's sub-task reuse: the module of a few classes (union of their masks, extracted), "
                             "a new head, fine-tuned on those classes")
    st.add_argument("--modules", required=True, help="module-set directory (any method's)")
    st.add_argument("--classes", required=True, help="the sub-task's classes, at least 2: e.g. 0,3 or 2-4")
    st.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                    help="also classify the sub-task's test images with this trained model, its logits restricted "
                         "to --classes (e.g. the standard model of the same architecture; repeat the flag)")
    st.add_argument("--data-dir", default=None)
    g = st.add_argument_group("fine-tuning (TrainConfig; not given: the sub-task recipe's value, SGD Nesterov "
                              "0.05, cosine over 2 x epochs, best validation epoch)")
    for field, kind, help_ in (("epochs", int, "epochs"), ("batch_size", int, "images per step"),
                               ("lr", float, "learning rate")):
        config_flag(g, TrainConfig, field, help_, presets={"sub-task": SUBTASK_RECIPE}, type=kind)
    config_flag(g, TrainConfig, "train_images", "fine-tune on at most this many of the classes' training images",
                type=int)
    config_flag(g, TrainConfig, "seed", "seed of the head's init, split and shuffles", type=int)
    st.add_argument("--out", required=True, help="directory of the fine-tuned module, its head and subtask.json")
    st.add_argument("--resume", action="store_true", help="continue the fine-tuning in --out")
    st.add_argument("--overwrite", action="store_true", help="replace what --out holds")


def build_parser() -> argparse.ArgumentParser:
    """The ``cnnsplit`` parser (each subcommand's handler is set by ``cli.commands``)."""
    CONFIG_FLAGS.clear()
    p = argparse.ArgumentParser(prog="cnnsplit", description="Decompose trained CNN classifiers into "
                                "reusable per-class modules (GradSplitter, CNNSplitter, concern identification).")
    p.add_argument("--verbose", action="store_true", help="show the full cause of errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show the full cause of errors")
    common.add_argument("--trust-definition", action="store_true",
                        help="allow loading models adapted from your own code (cnnsplit adapt): that imports and "
                             "calls the definition recorded in the artefact; without it such artefacts are refused")
    mh = common.add_argument_group("several processes (jax.distributed; one command per host, same flags "
                                   "but --process-id)")
    mh.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="process 0's address (default: $JAX_COORDINATOR_ADDRESS)")
    mh.add_argument("--num-processes", type=int, default=None, help="processes in the run "
                    "(default: $JAX_NUM_PROCESSES)")
    mh.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1 "
                    "(default: $JAX_PROCESS_ID)")
    mh.add_argument("--distributed", action="store_true",
                    help="join a multi-process run found by JAX's cluster detection (TPU pod, Slurm, Open MPI)")
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub, common)
    i = sub.add_parser("info", parents=[common], help="summarise a trained run directory")
    i.add_argument("run_dir")
    i.add_argument("--json", action="store_true", help="also print the metadata as JSON")
    _adapt_parser(sub, common)
    _split_parser(sub, common)
    ev = sub.add_parser("evaluate", parents=[common], help="re-evaluate a saved module set")
    ev.add_argument("mod_dir")
    ev.add_argument("--dataset", default=None, help="default: the module set's dataset")
    ev.add_argument("--data-dir", default=None)
    _mesh_flag(ev, "data", "each batch of images the modules run on split over the devices")
    _reuse_parsers(sub, common)
    _subtask_parser(sub, common)
    d = sub.add_parser("demo", parents=[common], help="offline end-to-end demo on digits "
                       "(train, split, evaluate, compose, patch)")
    d.add_argument("--out", default="runs/demo", help="(default runs/demo)")
    config_flag(d, DemoConfig, "seed", "seed of every run", type=int)
    config_flag(d, DemoConfig, "modularity_epochs", "GradSplitter's modularization epochs (whole 7-epoch "
                "cycles)", type=int)
    _mesh_flag(d, "data", "every stage's batches split over the devices (default: each stage's own default)")
    d.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    return p
