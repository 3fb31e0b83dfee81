"""CNNSplitter's search: preprocessing, then generations of all N per-class GAs advanced
together (evosax-style ``init`` / ``step``), the joint fitness, the reference's best-generation
rule and early stop, per-generation checkpoints with bit-identical resume.

Modules are the base model under the decoded masks, scored by their class logit (no heads).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ... import checkpoint as ckpt
from ... import mesh as meshlib
from ...data import class_holdout, normalize
from ...models import flatten_masks, kernel_multiplicity, mask_points
from ...models.protocol import SplittableModel
from ...models.protocol import KERNEL_MASKS, require
from ...models import effective_masks
from ...modules.module_set import ModuleSet
from ...progress import Progress, RunWarning, callbacks_of, notify
from ..base import SplitData, SplitResult, check_data, resume_identity
from .config import CNNSplitterConfig
from .fitness import FitnessConfig, jaccard_distance_table, joint_fitness
from .genome import GenomeLayout, decode, genome_layout, heuristic_population
from .importance import Importance, importance_order, kernel_importance
from .generation import CNNSplitterState, ask_or_keep, generation_keys, init_or_tell
from .logits import LogitCache, LogitStore, cached_module_logits
from .sensitivity import RATIOS, layer_sensitivity, sensitive_layers

__all__ = ["Prepared", "Problem", "CNNSplitterState", "prepare", "problem", "init", "step", "split", "report"]

CKPT = "ga"


class Prepared(NamedTuple):
    """Preprocessing (spec 1a): kernel importance, its per-class kernel order ``{point: int
    [N, C]}``, layer sensitivity ``{point: [accuracy per ratio]}`` (empty when the sensitive
    layers were given), the sensitive mask points, and the seconds of each phase."""

    importance: Importance
    order: dict
    sensitivity: dict
    sensitive: tuple
    seconds: dict


def prepare(model: SplittableModel, x_u8: np.ndarray, y: np.ndarray, mean, std, cfg: CNNSplitterConfig,
            ratios: Sequence[float] = RATIOS, sensitivity: dict | None = None,
            importance_images: tuple[np.ndarray, np.ndarray] | None = None) -> Prepared:
    """Kernel importance on ``x_u8`` (or on ``importance_images`` = (images, labels) when
    given), then (unless ``cfg.sensitive`` is given) layer sensitivity on the first
    ``cfg.sensitivity_images`` images of ``x_u8`` and the automatic rule. A ``sensitivity`` table
    computed before (``{point: [accuracy per ratio]}``, e.g. from a checkpoint) is used as is."""
    t0 = time.perf_counter()
    xi, yi = importance_images if importance_images is not None else (x_u8, y)
    imp = kernel_importance(model, xi, yi, mean, std, threshold=cfg.importance_threshold)
    order = importance_order(imp)
    t1 = time.perf_counter()
    if cfg.sensitive is None and sensitivity is not None:
        sens = {p: [float(a) for a in accs] for p, accs in sensitivity.items()}
        sensitive = sensitive_layers(sens, ratios, cfg.sensitivity_drop)
    elif cfg.sensitive is None:
        k = cfg.sensitivity_images or len(y)
        x_norm = normalize(jnp.asarray(x_u8[:k]), jnp.asarray(mean), jnp.asarray(std))
        sens = layer_sensitivity(model, order, x_norm, y[:k], ratios)
        sensitive = sensitive_layers(sens, ratios, cfg.sensitivity_drop)
    else:
        sens, sensitive = {}, tuple(cfg.sensitive)
    return Prepared(imp, order, sens, tuple(sensitive),
                    {"importance": t1 - t0, "sensitivity": time.perf_counter() - t1})


@dataclasses.dataclass(frozen=True)
class Problem:
    """What every generation reads and nothing changes: the model, the config, the genome
    layout, the GA (evosax ``PopulationBasedAlgorithm``) and its params, the fitness config,
    the per-class kernel order, and the fitness images (normalised) with their labels."""

    model: SplittableModel
    cfg: CNNSplitterConfig
    prepared: Prepared
    layout: GenomeLayout
    ga: object
    params: object
    fitness: FitnessConfig
    order: dict
    x_fit: jax.Array
    y_fit: np.ndarray
    decode: object  # jitted: genomes [N, P, G], orders -> masks {point: [N, P, C]}
    mesh: object = None  # splits the N x P modules of a generation over its ``modules`` axis


def problem(model: SplittableModel, cfg: CNNSplitterConfig, prepared: Prepared, x_u8: np.ndarray, y: np.ndarray,
            mean, std, mesh=None) -> Problem:
    """The fixed pieces of a search on the search images ``x_u8`` (fitness on the first
    ``cfg.eval_images``)."""
    layout = genome_layout(model, cfg.groups)
    if cfg.algorithm == "cnnsplitter":
        from .ga import CNNSplitterGA  # evosax loads on first use (see the package's __getattr__)

        ga = CNNSplitterGA(cfg.population, jnp.zeros(layout.num_genes), num_parents=cfg.num_parents,
                           keep_parents=cfg.keep_parents, mutation_percent=cfg.mutation_percent)
        params = ga.default_params
    else:
        import optax
        from evosax.algorithms import SimpleGA

        ga = SimpleGA(cfg.population, jnp.zeros(layout.num_genes), std_schedule=optax.constant_schedule(0.5))
        params = ga.default_params.replace(crossover_rate=0.5)
    k = cfg.eval_images or len(y)
    x_fit = normalize(jnp.asarray(x_u8[:k]), jnp.asarray(mean), jnp.asarray(std))
    decode_all = jax.jit(jax.vmap(jax.vmap(lambda g, o: decode(layout, g, o), in_axes=(0, None)),
                                  in_axes=(0, 0)))
    return Problem(model, cfg, prepared, layout, ga, params,
                   FitnessConfig(cfg.alpha, dict(cfg.thresholds) if cfg.thresholds else None, cfg.min_keep,
                                 cfg.max_keep),
                   {k2: jnp.asarray(v) for k2, v in prepared.order.items()}, x_fit, np.asarray(y[:k]),
                   decode_all, mesh)


def init(key: jax.Array, pb: Problem) -> CNNSplitterState:
    """The importance-weighted initial population of every class (one draw shared by all
    classes unless ``cfg.shared_initial_population`` is False) and fresh GA states."""
    cfg, n = pb.cfg, pb.model.num_classes
    k_pop = jax.random.fold_in(key, 1)
    keys = (jnp.broadcast_to(k_pop, (n,)) if cfg.shared_initial_population else jax.random.split(k_pop, n))
    pops = jax.vmap(lambda k: heuristic_population(k, pb.layout, cfg.population, pb.prepared.sensitive,
                                                   cfg.sensitive_ratios, cfg.other_ratios))(keys)
    if cfg.algorithm == "simple_ga":  # continuous genome: gene kept where > 0
        pops = pops - 0.5
    states = jax.vmap(pb.ga.init, in_axes=(0, 0, 0, None))(
        jax.random.split(key, n), pops, jnp.zeros((n, cfg.population)), pb.params)
    best = {p.name: jnp.zeros((n, p.size)) for p in mask_points(pb.model)}
    return CNNSplitterState(states, pops, jnp.float32(cfg.alpha), best)


def _evaluate(pb: Problem, pops, cache: LogitCache | None):
    """Decoded masks (keep-one rule) ``{point: [N, P, C]}``, class logits [N, P, n], kept-kernel
    sets [N, P, K] and the logit cache of a population."""
    n, p = pb.model.num_classes, pb.cfg.population
    bits = (pops > 0).astype(jnp.float32)
    eff = effective_masks({k: np.asarray(v) for k, v in pb.decode(bits, pb.order).items()})
    flat = {k: v.reshape(n * p, -1) for k, v in eff.items()}
    classes = np.repeat(np.arange(n), p)
    rows = np.concatenate([classes[:, None], np.asarray(bits).reshape(n * p, -1)], axis=1).astype(np.uint8)
    logits, cache = cached_module_logits(pb.model, flat, rows, classes, pb.x_fit, cache,
                                         group=pb.cfg.module_group, mesh=pb.mesh)
    kernels = np.asarray(flatten_masks(pb.model, eff, tied=True)) > 0
    return eff, logits.reshape(n, p, -1), kernels, cache


def step(key: jax.Array, state: CNNSplitterState, pb: Problem, *,
         store: LogitStore | None = None) -> tuple[CNNSplitterState, dict]:
    """Run generation ``state.generation`` (evosax order: key, state, then the problem): ask
    (from generation 1 on), evaluate every individual, the joint fitness, tell; the
    best-generation rule. ``key``: the search key (the generation's keys are derived from it).
    ``store``: a ``LogitStore`` whose cache of the last population's logits this generation
    reads and replaces (individuals evaluated before are not recomputed); None: no cache.
    Returns (new state, the generation's record). ``generation.generation_step`` is the same
    generation as a pure, jittable function."""
    cfg, n, g = pb.cfg, pb.model.num_classes, int(state.generation)
    tg = time.perf_counter()
    k_perm, k_ask, k_tell = generation_keys(key, g)
    pops, states = ask_or_keep(pb, k_ask, state, g == 0)
    eff, L, kernels, cache = _evaluate(pb, pops, store.cache if store is not None else None)
    if store is not None:
        store.cache = cache
    D = jaccard_distance_table(jnp.asarray(kernels))
    perm = [int(c) for c in np.asarray(jax.random.permutation(k_perm, n))]
    acc_ratio = float(np.float32(state.acc_ratio))
    res = joint_fitness(jnp.asarray(L), jnp.asarray(pb.y_fit), D, perm, acc_ratio=acc_ratio,
                        generation=g, cfg=pb.fitness)
    fit = np.asarray(res.fitness)
    states = init_or_tell(pb, k_tell, pops, res.fitness, states, g == 0)
    ensemble = fit.argmax(1)
    valid_acc = float((L[np.arange(n), ensemble].argmax(0) == pb.y_fit).mean())
    valid_fitness = cfg.alpha * valid_acc + (1 - cfg.alpha) * float(res.best_diff) if g > 0 else 0.0
    mult = kernel_multiplicity(pb.model)  # a tied point's kernels once per gated conv
    kept = np.mean([sum(eff[k][c, ensemble[c]].sum() * mult[k] for k in eff) for c in range(n)])
    rec = {"generation": g, "best_fitness": float(res.best_fitness), "accuracy": float(res.best_accuracy),
           "diff": float(res.best_diff), "valid_accuracy": valid_acc, "valid_fitness": valid_fitness,
           "acc_ratio": acc_ratio, "mean_kept_kernels": float(kept), "ensemble": ensemble.tolist(),
           "seconds": time.perf_counter() - tg}
    new = state._replace(ga=states, population=pops, generation=g + 1,
                         # float32 like the checkpointed value: a resumed run computes the same fitness
                         acc_ratio=jnp.float32(cfg.alpha + max(0.0, cfg.gamma - float(res.best_accuracy))))
    if valid_fitness > state.best_valid_fitness:
        new = new._replace(best_valid_fitness=valid_fitness, best_generation=g, flat=0,
                           best_masks={k: jnp.asarray(v[np.arange(n), ensemble]) for k, v in eff.items()})
    else:
        new = new._replace(flat=state.flat + 1)
    return new, rec


_COUNTERS = ("generation", "best_generation", "best_valid_fitness", "flat")


def split(key: jax.Array, model: SplittableModel, data: SplitData, cfg: CNNSplitterConfig = CNNSplitterConfig(), *,
          ckpt_dir: str | Path | None = None, resume: bool = False, callbacks=None,
          sensitivity_ratios: Sequence[float] = RATIOS, mesh=None, identity: dict | None = None) -> SplitResult:
    """The whole search on ``data``'s validation split (the reference's 20% of the training
    set: importance, sensitivity and fitness alike).

    Checkpoints every generation to ``ckpt_dir`` (``ga/`` + ``ga.json``, with the sensitivity
    table); ``resume`` continues bit-identically (the same config, model weights, search images
    and the caller's ``identity`` required, a difference refused naming it) without repeating
    the sensitivity analysis, and
    ``seconds`` / ``phase_seconds`` add up over the interrupted and the resumed calls. Callbacks get a ``Progress("generation", ...)`` per generation. Returns a
    ``ModuleSet`` without heads (module c scored by its class logit) of the best validation
    generation; details: ``importance``, ``sensitivity``, ``sensitive``, ``best_generation``,
    ``phase_seconds``. Raises ``FloatingPointError`` on NaN module logits. ``mesh``: devices
    the generation's class x individual modules are split over (axis ``modules``; None: every
    local device); the GA states stay whole (kilobytes) and the fitness runs where the logits
    are gathered.
    """
    require(model, KERNEL_MASKS, "CNNSplitter", "decompose it by concern identification")
    x_u8, y = data.x_val, np.asarray(data.y_val)
    if len(x_u8) != len(y):
        raise ValueError(f"{len(x_u8)} images but {len(y)} labels")
    check_data(data, model.num_classes)
    cbs = callbacks_of(callbacks)
    t_start = time.perf_counter()
    loop = ckpt.ResumableLoop(ckpt_dir, CKPT, ckpt.config_json(cfg), resume_identity(model, data, identity, train=False))
    ratios = [float(r) for r in sensitivity_ratios]
    prep_before = {}
    if resume:
        if ckpt_dir is None:
            raise ValueError("resume=True needs ckpt_dir")
        # the sensitivity table is checkpointed with the GA (minutes of work on a large model)
        prep_before = ckpt.read_progress(ckpt_dir, CKPT, loop.config, loop.identity).get("prepare", {})
    known = prep_before.get("sensitivity") if prep_before.get("ratios") == ratios else None
    prep = prepare(model, x_u8, y, data.mean, data.std, cfg, sensitivity_ratios, sensitivity=known,
                   importance_images=importance_images(data, cfg, model.num_classes))
    prep_seconds = {k: v + prep_before.get("seconds", {}).get(k, 0.0) for k, v in prep.seconds.items()}
    prep_record = {"ratios": ratios, "sensitivity": prep.sensitivity, "seconds": prep_seconds}
    pb = problem(model, cfg, prep, x_u8, y, data.mean, data.std, meshlib.resolve(mesh))
    state = init(key, pb)
    if resume:
        tree = loop.resume(_tree(state))
        state = state._replace(ga=tree["states"], population=tree["pops"], acc_ratio=tree["acc_ratio"],
                               best_masks=tree["best_masks"], **{c: loop.fields[c] for c in _COUNTERS})
        t_start -= loop.fields.get("search_seconds", 0.0)  # wall time is cumulative over resumes
    store = LogitStore()  # the host cache of logits, outside the (pure) state
    while state.generation <= cfg.generations:
        state, rec = step(key, state, pb, store=store)
        loop.seconds += rec["seconds"]
        loop.record(rec, _tree(state), prepare=prep_record, search_seconds=time.perf_counter() - t_start,
                    **{c: getattr(state, c) for c in _COUNTERS})
        _warn_near_chance(rec, model.num_classes)
        notify(cbs, Progress("generation", rec["generation"], cfg.generations + 1, metrics=rec))
        if cfg.early_stop and rec["generation"] > 0 and state.flat >= cfg.early_stop:
            break
    state, best = _best_ensemble(pb, state, loop.history)
    ms = ModuleSet(model, {k: np.asarray(v, np.float32) for k, v in state.best_masks.items()}, None,
                   {"method": "ga", "normalization": data.normalization.to_json(), "best_generation": best,
                    "config": loop.config})
    return SplitResult(ms, loop.history, time.perf_counter() - t_start, {
        "importance": prep.importance, "sensitivity": prep.sensitivity, "sensitive": prep.sensitive,
        "best_generation": best, "phase_seconds": {**prep_seconds, "ga": loop.seconds}, "state": state})


def importance_images(data: SplitData, cfg: CNNSplitterConfig, num_classes: int):
    """``None`` (importance on the search split) or, for ``cfg.importance_data == "reference"``,
    (images, labels): per class the reference's held-out 20% of its training images
    (``data.class_holdout`` over ``data.x_all``)."""
    if cfg.importance_data == "search":
        return None
    if data.x_all is None or data.y_all is None:
        raise ValueError("importance_data='reference' needs SplitData.x_all / y_all (the whole training set in "
                         "file order)")
    idx = np.concatenate([class_holdout(data.y_all, c) for c in range(num_classes)])
    return data.x_all[idx], np.asarray(data.y_all)[idx]


def _warn_near_chance(rec: dict, num_classes: int) -> None:
    chance = 1.0 / num_classes
    if rec["generation"] == 0 and rec["accuracy"] < chance + 0.25 * (1.0 - chance):
        warnings.warn(
            f"the initial population composes to accuracy {rec['accuracy']:.3f} (chance {chance:.3f}): "
            "its kept ratios remove too much of this model; raise the initial ratios (sensitive_ratios / "
            "other_ratios) or use the 'narrow' preset", RunWarning, stacklevel=3)


def _best_ensemble(pb: Problem, state: CNNSplitterState, history: list[dict]) -> tuple[CNNSplitterState, int]:
    """(state, best generation): the best validation generation's ensemble, or, when only
    generation 0 ran, that generation's."""
    if state.best_generation >= 0:
        return state, state.best_generation
    eff, _, _, _ = _evaluate(pb, state.population, None)
    ens = np.asarray(history[-1]["ensemble"])
    n = pb.model.num_classes
    return state._replace(best_masks={k: jnp.asarray(v[np.arange(n), ens]) for k, v in eff.items()}), \
        history[-1]["generation"]


def _tree(state: CNNSplitterState) -> dict:
    return {"states": state.ga, "pops": state.population, "acc_ratio": state.acc_ratio,
            "best_masks": state.best_masks}


def report(result: SplitResult, data: SplitData) -> dict:
    """CNNSplitter's fields of ``split.json``."""
    d = result.details
    return {"best_generation": d["best_generation"], "generations": len(result.history),
            "best_fitness": [h["best_fitness"] for h in result.history], "history": result.history,
            "sensitivity": d["sensitivity"], "sensitive_layers": list(d["sensitive"]),
            "sensitive_layers_from": _sensitive_source(result.module_set.meta["config"]),
            "importance_data": result.module_set.meta["config"].get("importance_data", "search"),
            "search_seconds": result.seconds, "phase_seconds": d["phase_seconds"],
            "search_images": int(len(data.y_val))}


def _sensitive_source(config: dict) -> str:
    if config.get("sensitive") is not None:
        return "the config (the preset's sensitive layers, or --sensitive)"
    return (f"the automatic rule: more than {100 * config.get('sensitivity_drop', 0.05):.0f} pt accuracy lost "
            "keeping half of a layer's kernels")


def summary_line(report: dict) -> str:
    """One line under the module table of ``split.json``'s CNNSplitter fields."""
    return f"best generation {report['best_generation']} of {report['generations'] - 1}"
