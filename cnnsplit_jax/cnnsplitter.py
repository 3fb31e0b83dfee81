"""CNNSplitter (Qi et al., ASE 2022): per-class kernel masks searched by a genetic algorithm.

Pieces (spec cnnsplitter.md): ``importance.kernel_importance`` (1a.3), ``layer_sensitivity``
(1a.4, plus a documented automatic rule), ``genome`` (grouped genome, heuristic initial
population), ``ga.CNNSplitterGA`` (the reference's operators on evosax's init/ask/tell, one
GA per class advanced together with vmap), ``fitness.joint_fitness`` (the recorder), and
``run`` here: generations with per-generation checkpoints and bit-identical resume, the
reference's best-generation rule and early stop.

Modules are the base model under the decoded masks, scored by their class logit (no heads);
module logits are dense masked forwards of all N x P individuals (``lax.map`` over groups of
individuals, vmapped inside a group).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as ckpt
from .data import normalize
from .extract import effective_masks
from .fitness import FitnessConfig, jaccard_distance_table, joint_fitness
from .ga import CNNSplitterGA
from .genome import decode, genome_layout, heuristic_population
from .importance import Importance, importance_order, kernel_importance
from .masks import flatten_masks
from .models import MaskedCNN

__all__ = ["CNNSplitterConfig", "SearchResult", "layer_sensitivity", "sensitive_layers",
           "module_logits", "cached_module_logits", "LogitCache", "run"]


@dataclasses.dataclass(frozen=True)
class CNNSplitterConfig:
    """Defaults = the reference's simcnn_cifar10 config (population 100, 200 generations, 5%
    mutation, 50 parents, 20 kept, alpha 0.9, gamma 0.9, init ratios {.6,.7,.8} / {.4..7}).

    groups: genes per layer (None: 10 below 256 kernels, else 100). sensitive: mask points
    initialised with ``sensitive_ratios`` (None: the automatic rule of ``sensitive_layers``).
    eval_images / sensitivity_images: images of the search split used for fitness / the
    sensitivity analysis (0: all; CPU budgets). early_stop:
    generations without a better validation fitness before stopping (0: off).
    algorithm: ``"cnnsplitter"`` (the paper's operators, ``ga.CNNSplitterGA``) or
    ``"simple_ga"``: evosax's stock SimpleGA on a continuous genome thresholded at 0 (std
    0.5, crossover rate 0.5; no elitism) -- a fast alternative, not the paper's algorithm.
    """

    population: int = 100
    generations: int = 200
    groups: int | None = None
    mutation_percent: float = 5.0
    num_parents: int = 50
    keep_parents: int = 20
    alpha: float = 0.9
    gamma: float = 0.9
    sensitive: tuple[str, ...] | None = None
    sensitive_ratios: tuple[float, ...] = (0.6, 0.7, 0.8)
    other_ratios: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7)
    sensitivity_drop: float = 0.05
    importance_threshold: float = 0.9
    eval_images: int = 0
    sensitivity_images: int = 0
    early_stop: int = 0
    min_keep: int = 50
    max_keep: int = 500
    module_group: int = 10
    algorithm: str = "cnnsplitter"  # or "simple_ga": stock evosax, NOT the paper's algorithm
    seed: int = 0


# ------------------------------------------------------------------ module logits
@functools.partial(jax.jit, static_argnames=("group",))
def _class_logits(model, masks, classes, x, group):
    """[M, B] logit ``classes[m]`` of module m (masks ``{point: [M, C]}``) on images x."""
    m = classes.shape[0]
    pad = (-m) % group
    masks = {k: jnp.concatenate([v, jnp.repeat(v[:1], pad, 0)]) for k, v in masks.items()}
    cls = jnp.concatenate([classes, jnp.repeat(classes[:1], pad)])
    chunks = {k: v.reshape(-1, group, v.shape[-1]) for k, v in masks.items()}

    def one_group(args):
        mk, c = args
        logits = jax.vmap(lambda mm: model(x, mm))(mk)  # [group, B, K]
        return jnp.take_along_axis(logits, c[:, None, None], axis=2)[..., 0]

    out = jax.lax.map(one_group, (chunks, cls.reshape(-1, group)))
    return out.reshape(-1, x.shape[0])[:m]


def module_logits(model: MaskedCNN, masks: dict, classes: np.ndarray, x_norm: jax.Array,
                  batch_size: int = 256, group: int = 10) -> np.ndarray:
    """Class logits [M, n] of M masked modules (``{point: [M, C]}``) on normalised images."""
    out = [np.asarray(_class_logits(model, masks, jnp.asarray(classes), x_norm[i : i + batch_size], group))
           for i in range(0, x_norm.shape[0], batch_size)]
    return np.concatenate(out, axis=1)


class LogitCache(NamedTuple):
    """Rows ``[class, binary genome]`` (uint8 [R, 1 + G]) and their logits [R, n]."""

    rows: np.ndarray
    logits: np.ndarray


def cached_module_logits(model: MaskedCNN, masks: dict, rows: np.ndarray, classes: np.ndarray,
                         x_norm: jax.Array, cache: LogitCache | None, group: int = 10,
                         bucket: int = 100) -> tuple[np.ndarray, LogitCache]:
    """``module_logits`` computed once per distinct (class, genome): duplicates in the
    population and individuals already evaluated (``cache``, e.g. the previous generation,
    whose 20 elites survive unchanged) are not recomputed. The number of modules computed is
    padded to a multiple of ``bucket`` (bounded recompiles). Returns (logits [M, n], cache
    of this population)."""
    m = rows.shape[0]
    prev = cache.rows if cache is not None else np.zeros((0, rows.shape[1]), rows.dtype)
    both = np.concatenate([prev, rows])
    _, first, inverse = np.unique(both, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    cur = inverse[len(prev):]
    need = np.unique(cur[first[cur] >= len(prev)])  # distinct rows first seen in this population
    out = np.zeros((m, x_norm.shape[0]), np.float32)
    if need.size:
        rep = first[need] - len(prev)  # a representative current row per distinct genome
        pad = (-len(rep)) % bucket
        sel = np.concatenate([rep, np.repeat(rep[:1], pad)])
        logits = module_logits(model, {k: v[sel] for k, v in masks.items()}, classes[sel], x_norm, group=group)
        lut = np.full(len(first), -1)
        lut[need] = np.arange(len(need))
        hit = lut[cur] >= 0
        out[hit] = logits[lut[cur[hit]]]
    cached = first[cur] < len(prev)
    if cached.any():
        out[cached] = cache.logits[first[cur[cached]]]
    return out, LogitCache(rows, out)


# ------------------------------------------------------------------ sensitivity
def layer_sensitivity(model: MaskedCNN, order: dict, x_norm: jax.Array, y: np.ndarray,
                      ratios: Sequence[float] = tuple(np.round(np.arange(1, 11) / 10, 1))) -> dict:
    """Composed accuracy when one mask point keeps only its top ``floor(r * C)`` kernels (by
    each class's importance) and all others are full: ``{point: [accuracy per ratio]}``.

    The N modules are composed by argmax over module c's class-c logit (spec 1a.4).
    """
    n = model.num_classes
    points = {p.name: p.size for p in model.mask_points()}
    out = {}
    for point, size in points.items():
        accs = []
        for r in ratios:
            k = int(np.floor(r * size))
            masks = {q: np.ones((n, s), np.float32) for q, s in points.items()}
            keep = np.zeros((n, size), np.float32)
            for c in range(n):
                keep[c, order[point][c][:k]] = 1.0
            masks[point] = keep
            eff = effective_masks(masks)
            logits = module_logits(model, {q: jnp.asarray(v) for q, v in eff.items()}, np.arange(n), x_norm)
            accs.append(float((logits.argmax(0) == y).mean()))
        out[point] = accs
    return out


def sensitive_layers(sensitivity: dict, ratios: Sequence[float], drop: float = 0.05) -> tuple[str, ...]:
    """The automatic rule: a mask point is *sensitive* when keeping only half of its kernels
    (the ratio closest to 0.5) loses more than ``drop`` accuracy against keeping all."""
    r = list(ratios)
    half = int(np.argmin(np.abs(np.asarray(r) - 0.5)))
    full = int(np.argmax(r))
    return tuple(p for p, accs in sensitivity.items() if accs[full] - accs[half] > drop)


# ------------------------------------------------------------------ driver
@dataclasses.dataclass
class SearchResult:
    """masks: ``{point: float 0/1 [N, C]}`` of the best generation's ensemble (keep-one rule
    applied); history: one record per generation; importance / sensitivity: preprocessing."""

    masks: dict
    history: list
    best_generation: int
    importance: Importance
    sensitivity: dict
    sensitive: tuple
    search_seconds: float
    phase_seconds: dict


def _cfg_json(cfg: CNNSplitterConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def run(model: MaskedCNN, search: tuple[np.ndarray, np.ndarray], mean, std,
        cfg: CNNSplitterConfig = CNNSplitterConfig(), *, out_dir: str | Path | None = None,
        resume: bool = False, on_generation: Callable[[int, dict], None] | None = None,
        sensitivity_ratios: Sequence[float] = tuple(np.round(np.arange(1, 11) / 10, 1))) -> SearchResult:
    """The whole search on ``search`` = (uint8 images, labels): the reference's 20% split of
    the training set, used for importance, sensitivity and fitness alike.

    Checkpoints every generation to ``out_dir`` (``ga/`` + ``ga.json``); ``resume`` continues
    bit-identically. Raises ``FloatingPointError`` on NaN module logits.
    """
    x_u8, y = search
    n = model.num_classes
    t_start = time.perf_counter()
    phases = {}
    x_norm = normalize(jnp.asarray(x_u8), jnp.asarray(mean), jnp.asarray(std))
    t0 = time.perf_counter()
    imp = kernel_importance(model, x_u8, y, mean, std, threshold=cfg.importance_threshold)
    order = importance_order(imp)
    phases["importance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cfg.sensitive is None:
        k = cfg.sensitivity_images or len(y)
        sens = layer_sensitivity(model, order, x_norm[:k], y[:k], sensitivity_ratios)
        sensitive = sensitive_layers(sens, sensitivity_ratios, cfg.sensitivity_drop)
    else:
        sens, sensitive = {}, tuple(cfg.sensitive)
    phases["sensitivity"] = time.perf_counter() - t0

    layout = genome_layout(model, cfg.groups)
    if cfg.algorithm == "cnnsplitter":
        ga = CNNSplitterGA(cfg.population, jnp.zeros(layout.num_genes), num_parents=cfg.num_parents,
                           keep_parents=cfg.keep_parents, mutation_percent=cfg.mutation_percent)
        params = ga.default_params
    elif cfg.algorithm == "simple_ga":
        import optax
        from evosax.algorithms import SimpleGA

        ga = SimpleGA(cfg.population, jnp.zeros(layout.num_genes), std_schedule=optax.constant_schedule(0.5))
        params = ga.default_params.replace(crossover_rate=0.5)
    else:
        raise ValueError(f"algorithm must be 'cnnsplitter' or 'simple_ga', got {cfg.algorithm!r}")
    fcfg = FitnessConfig(cfg.alpha, None, cfg.min_keep, cfg.max_keep)
    order_j = {k: jnp.asarray(v) for k, v in order.items()}
    if cfg.eval_images:
        x_fit, y_fit = x_norm[: cfg.eval_images], y[: cfg.eval_images]
    else:
        x_fit, y_fit = x_norm, y
    key = jax.random.key(cfg.seed)
    classes = np.repeat(np.arange(n), cfg.population)

    decode_all = jax.jit(jax.vmap(jax.vmap(lambda g, o: decode(layout, g, o), in_axes=(0, None)),
                                  in_axes=(0, 0)))

    def evaluate(pops, cache=None):
        bits = (pops > 0).astype(jnp.float32)
        masks = decode_all(bits, order_j)  # {point: [N, P, C]}
        eff = effective_masks({k: np.asarray(v) for k, v in masks.items()})
        flat = {k: v.reshape(n * cfg.population, -1) for k, v in eff.items()}
        rows = np.concatenate([classes[:, None], np.asarray(bits).reshape(n * cfg.population, -1)],
                              axis=1).astype(np.uint8)
        L, cache = cached_module_logits(model, flat, rows, classes, x_fit, cache, group=cfg.module_group)
        kernels = np.asarray(flatten_masks(model, eff, tied=True)) > 0  # [N, P, K]
        return eff, L.reshape(n, cfg.population, -1), kernels, cache

    init_pops = jax.vmap(lambda k: heuristic_population(k, layout, cfg.population, sensitive,
                                                        cfg.sensitive_ratios, cfg.other_ratios))(
        jax.random.split(jax.random.fold_in(key, 1), n))
    if cfg.algorithm == "simple_ga":  # continuous genome: gene kept where > 0
        init_pops = init_pops - 0.5
    states = jax.vmap(ga.init, in_axes=(0, 0, 0, None))(
        jax.random.split(key, n), init_pops, jnp.zeros((n, cfg.population)), params)
    tree = {"states": states, "pops": init_pops, "acc_ratio": jnp.float32(cfg.alpha),
            "best_masks": {p.name: jnp.zeros((n, p.size)) for p in model.mask_points()}}
    progress = {"generation": -1, "history": [], "best_generation": -1, "best_valid_fitness": 0.0,
                "flat": 0, "seconds": 0.0}
    out = Path(out_dir) if out_dir else None
    if resume:
        if out is None:
            raise ValueError("resume=True needs out_dir")
        progress = ckpt.read_progress(out, "ga.json", _cfg_json(cfg))
        tree = ckpt.load_tree(out / "ga", tree)
    states, pops = tree["states"], tree["pops"]
    acc_ratio = float(np.float32(tree["acc_ratio"]))
    t_ga = time.perf_counter()
    cache = None  # a resumed run recomputes its first generation (same numbers)
    for g in range(progress["generation"] + 1, cfg.generations + 1):
        tg = time.perf_counter()
        kg = jax.random.fold_in(key, 1000 + g)
        k_perm, k_ask, k_tell = jax.random.split(kg, 3)
        if g > 0:
            pops, states = jax.vmap(ga.ask, in_axes=(0, 0, None))(jax.random.split(k_ask, n), states, params)
        eff, L, kernels, cache = evaluate(pops, cache)
        D = jaccard_distance_table(jnp.asarray(kernels))
        perm = [int(c) for c in np.asarray(jax.random.permutation(k_perm, n))]
        res = joint_fitness(jnp.asarray(L), jnp.asarray(y_fit), D, perm, acc_ratio=acc_ratio,
                            generation=g, cfg=fcfg)
        fit = np.asarray(res.fitness)
        if g == 0:
            states = jax.vmap(ga.init, in_axes=(0, 0, 0, None))(
                jax.random.split(k_tell, n), pops, -res.fitness, params)
        else:
            states, _ = jax.vmap(ga.tell, in_axes=(0, 0, 0, 0, None))(
                jax.random.split(k_tell, n), pops, -res.fitness, states, params)
        ensemble = fit.argmax(1)
        valid_acc = float((L[np.arange(n), ensemble].argmax(0) == np.asarray(y_fit)).mean())
        valid_fitness = cfg.alpha * valid_acc + (1 - cfg.alpha) * float(res.best_diff) if g > 0 else 0.0
        kept = np.mean([sum(eff[k][c, ensemble[c]].sum() for k in eff) for c in range(n)])
        rec = {"generation": g, "best_fitness": float(res.best_fitness), "accuracy": float(res.best_accuracy),
               "diff": float(res.best_diff), "valid_accuracy": valid_acc, "valid_fitness": valid_fitness,
               "acc_ratio": acc_ratio, "mean_kept_kernels": float(kept), "ensemble": ensemble.tolist(),
               "seconds": time.perf_counter() - tg}
        # float32 like the checkpointed value, so a resumed run computes the same fitness
        acc_ratio = float(np.float32(cfg.alpha + max(0.0, cfg.gamma - float(res.best_accuracy))))
        progress["history"].append(rec)
        if valid_fitness > progress["best_valid_fitness"]:
            progress.update(best_valid_fitness=valid_fitness, best_generation=g, flat=0)
            tree["best_masks"] = {k: jnp.asarray(v[np.arange(n), ensemble]) for k, v in eff.items()}
        else:
            progress["flat"] += 1
        progress["generation"] = g
        progress["seconds"] += time.perf_counter() - tg
        if out is not None:
            tree.update(states=states, pops=pops, acc_ratio=jnp.float32(acc_ratio))
            ckpt.save_tree(out / "ga", tree)
            ckpt.write_json(out / "ga.json", {**progress, "config": _cfg_json(cfg)})
        if on_generation is not None:
            on_generation(g, rec)
        if cfg.early_stop and g > 0 and progress["flat"] >= cfg.early_stop:
            break
    phases["ga"] = time.perf_counter() - t_ga
    if progress["best_generation"] < 0:  # only generation 0 ran: take its ensemble
        rec = progress["history"][-1]
        eff, _, _, _ = evaluate(pops)
        ens = np.asarray(rec["ensemble"])
        tree["best_masks"] = {k: jnp.asarray(v[np.arange(n), ens]) for k, v in eff.items()}
        progress["best_generation"] = rec["generation"]
    masks = {k: np.asarray(v, np.float32) for k, v in tree["best_masks"].items()}
    return SearchResult(masks, progress["history"], progress["best_generation"], imp, sens, tuple(sensitive),
                        time.perf_counter() - t_start, phases)
