"""One CNNSplitter generation as a pure function of (key, state): ``generation_step(pb)``
returns ``step(key, state) -> (state, metrics)`` over a pure-pytree ``CNNSplitterState``
(counters as int32 / float32 arrays, no host cache), so a generation can be jitted and a
short search run under ``lax.scan``::

    step = jax.jit(generation_step(pb))
    state = as_arrays(init(key, pb))
    state, metrics = jax.lax.scan(lambda s, _: step(key, s), state, length=3)

The pieces are the ones the host loop (``search.step``) runs: the GA's ask / tell (vmapped over
classes), the genome decode with the keep-one rule, the masked forward, the Jaccard table, the
joint fitness (``fitness.joint_core``, the class order traced) and the best-generation rule.
The host loop adds what a pure function cannot hold: a cache of logits of individuals already
evaluated (``LogitStore``), checkpoints, float64 bookkeeping and progress; its numbers are those
of this function up to the float32 rounding of that bookkeeping (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ...models import effective_masks, flatten_masks, kernel_multiplicity
from .fitness import jaccard_distance_table, joint_core, thresholds_for
from .logits import _class_logits

__all__ = ["CNNSplitterState", "generation_keys", "ask_or_keep", "init_or_tell", "generation_step",
           "as_arrays"]


class CNNSplitterState(NamedTuple):
    """The search between generations, a pure pytree.

    ga: the N per-class GA states (evosax, stacked on a leading class axis); population:
    genomes [N, P, G] of the generation just evaluated (before generation 0: the initial
    population); acc_ratio: float32 accuracy weight of the next fitness; best_masks
    ``{point: [N, C]}``: the ensemble of the best validation generation so far; generation:
    the next generation to run; best_generation / best_valid_fitness / flat: the
    best-generation rule's bookkeeping (Python numbers in the host loop, arrays under jit).
    """

    ga: object
    population: jax.Array
    acc_ratio: jax.Array
    best_masks: dict
    generation: int = 0
    best_generation: int = -1
    best_valid_fitness: float = 0.0
    flat: int = 0


def as_arrays(state: CNNSplitterState) -> CNNSplitterState:
    """``state`` with its counters as int32 / float32 arrays (what ``lax.scan`` carries)."""
    return state._replace(generation=jnp.int32(state.generation), best_generation=jnp.int32(state.best_generation),
                          best_valid_fitness=jnp.float32(state.best_valid_fitness), flat=jnp.int32(state.flat))


def generation_keys(key: jax.Array, generation) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(class order, ask, tell) keys of ``generation`` from the search key."""
    return tuple(jax.random.split(jax.random.fold_in(key, 1000 + generation), 3))


def ask_or_keep(pb, k_ask, state: CNNSplitterState, first):
    """(population [N, P, G], GA states): the state's population at generation 0 (``first``),
    else each class's GA asked for a new one. ``first``: a Python bool (the host loop runs
    only the branch it needs) or a traced one (both run, one is selected)."""
    if first is True:
        return state.population, state.ga
    n = pb.model.num_classes
    pops, states = jax.vmap(pb.ga.ask, in_axes=(0, 0, None))(jax.random.split(k_ask, n), state.ga, pb.params)
    if first is False:
        return pops, states
    pick = lambda a, b: jnp.where(first, a, b)  # noqa: E731
    return pick(state.population, pops), jax.tree.map(pick, state.ga, states)


def init_or_tell(pb, k_tell, pops, fitness, states, first):
    """GA states after the fitness [N, P]: initialised with it at generation 0 (the reference
    scores the initial population first), else told."""
    keys = jax.random.split(k_tell, pb.model.num_classes)
    init = lambda: jax.vmap(pb.ga.init, in_axes=(0, 0, 0, None))(keys, pops, -fitness, pb.params)  # noqa: E731
    tell = lambda: jax.vmap(pb.ga.tell, in_axes=(0, 0, 0, 0, None))(  # noqa: E731
        keys, pops, -fitness, states, pb.params)[0]
    if first is True or first is False:  # the host loop: only the branch it needs
        return init() if first else tell()
    return jax.tree.map(lambda a, b: jnp.where(first, a, b), init(), tell())


def generation_step(pb):
    """``step(key, state) -> (state, metrics)``: generation ``state.generation`` of problem
    ``pb`` (``search.problem``), pure. ``key``: the search key (as the host loop's). metrics:
    ``best_fitness``, ``accuracy``, ``diff``, ``valid_accuracy``, ``valid_fitness``,
    ``acc_ratio``, ``mean_kept_kernels`` (float32) and ``ensemble`` (int32 [N])."""
    cfg, n, p = pb.cfg, pb.model.num_classes, pb.cfg.population
    thr = {k: jnp.float32(v) for k, v in thresholds_for(n, pb.fitness).items()}
    fcfg = pb.fitness._replace(thresholds=None)
    mult = kernel_multiplicity(pb.model)
    classes = jnp.repeat(jnp.arange(n), p)
    y = jnp.asarray(pb.y_fit, jnp.int32)

    def step(key, state: CNNSplitterState):
        g = state.generation
        first = g == 0
        k_perm, k_ask, k_tell = generation_keys(key, g)
        pops, states = ask_or_keep(pb, k_ask, state, first)
        eff = effective_masks(pb.decode((pops > 0).astype(jnp.float32), pb.order))
        flat = {k: v.reshape(n * p, -1) for k, v in eff.items()}
        L = _class_logits(pb.model, flat, classes, pb.x_fit, cfg.module_group).reshape(n, p, -1)
        kernels = flatten_masks(pb.model, eff, tied=True) > 0
        res = joint_core(L, y, jaccard_distance_table(kernels), jax.random.permutation(k_perm, n),
                         state.acc_ratio, ~first, thr, fcfg)
        states = init_or_tell(pb, k_tell, pops, res.fitness, states, first)
        ensemble = res.fitness.argmax(1)
        valid_acc = (L[jnp.arange(n), ensemble].argmax(0) == y).mean()
        valid_fitness = jnp.where(first, 0.0, cfg.alpha * valid_acc + (1 - cfg.alpha) * res.best_diff)
        kept = jnp.mean(sum(eff[k][jnp.arange(n), ensemble].sum(-1) * mult[k] for k in eff))
        better = valid_fitness > state.best_valid_fitness
        new = CNNSplitterState(
            states, pops, jnp.float32(cfg.alpha) + jnp.maximum(0.0, cfg.gamma - res.best_accuracy),
            jax.tree.map(lambda e, b: jnp.where(better, e[jnp.arange(n), ensemble], b), eff, state.best_masks),
            g + 1, jnp.where(better, g, state.best_generation),
            jnp.where(better, valid_fitness, state.best_valid_fitness), jnp.where(better, 0, state.flat + 1))
        metrics = {"best_fitness": res.best_fitness, "accuracy": res.best_accuracy, "diff": res.best_diff,
                   "valid_accuracy": valid_acc, "valid_fitness": valid_fitness, "acc_ratio": state.acc_ratio,
                   "mean_kept_kernels": kept, "ensemble": ensemble}
        return new, metrics

    return step
