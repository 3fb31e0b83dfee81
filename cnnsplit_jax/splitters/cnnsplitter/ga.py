"""CNNSplitter's genetic algorithm as an evosax ``PopulationBasedAlgorithm`` (spec
cnnsplitter.md 1b.5, evosax 0.3.2 API): the ``init`` / ``ask`` / ``tell`` of evosax, so it
runs under ``jit``, ``lax.scan`` and ``vmap`` (one GA per class, all classes together).

Operators of the reference (pygad configuration):

* steady-state selection: parents = the ``num_parents`` fittest (50), ranked as pygad ranks
  them (a stable ascending sort, reversed: equal fitness ranks by *descending* index);
* elitism: the next population starts with the ``keep_parents`` fittest (20), best first, so
  row 0 is always the previous generation's best;
* single-point crossover, no crossover probability: offspring k takes parent ``k mod 50`` for
  genes ``[0, cut)`` and parent ``(k + 1) mod 50`` for ``[cut, G)``, ``cut ~ U{0..G-1}``;
* mutation "by space": ``mutation_genes`` distinct positions per offspring, each set to a
  random choice of {0, 1} (so about half of them flip).

evosax minimises: pass ``-fitness``. Genomes are float 0/1 arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from evosax.algorithms.population_based.base import (
    Params as BaseParams,
    PopulationBasedAlgorithm,
    State as BaseState,
)
from flax import struct

__all__ = ["CNNSplitterGA", "GAState", "GAParams", "mutation_genes"]


@struct.dataclass
class GAState(BaseState):
    population: jax.Array  # [P, G] float 0/1
    fitness: jax.Array  # [P] (minimised)


@struct.dataclass
class GAParams(BaseParams):
    pass


def mutation_genes(num_genes: int, mutation_percent: float) -> int:
    """pygad's count: ``floor(mutation_percent * G / 100)``, at least 1 when the rate is positive
    (SimCNN 940 genes: 5% -> 47; 20 genes at 1% -> 1); a rate of 0 mutates nothing."""
    if mutation_percent <= 0:
        return 0
    return max(1, int(mutation_percent * num_genes // 100))


class CNNSplitterGA(PopulationBasedAlgorithm):
    """The reference's GA over binary genomes (see the module docstring)."""

    def __init__(self, population_size: int, solution: jax.Array, *, num_parents: int = 50,
                 keep_parents: int = 20, mutation_percent: float = 5.0, **kwargs):
        super().__init__(population_size, solution, **kwargs)
        if not 0 < keep_parents <= population_size:
            raise ValueError(f"keep_parents must be in (0, {population_size}], got {keep_parents}")
        if not 0 < num_parents <= population_size:
            raise ValueError(f"num_parents must be in (0, {population_size}], got {num_parents}")
        self.num_parents = int(num_parents)
        self.keep_parents = int(keep_parents)
        self.num_mutations = mutation_genes(self.num_dims, mutation_percent)

    @property
    def _default_params(self) -> GAParams:
        return GAParams()

    def _init(self, key: jax.Array, params: GAParams) -> GAState:
        return GAState(
            population=jnp.full((self.population_size, self.num_dims), jnp.nan),
            fitness=jnp.full((self.population_size,), jnp.inf),
            best_solution=jnp.full((self.num_dims,), jnp.nan),
            best_fitness=jnp.inf,
            generation_counter=0,
        )

    def _ask(self, key: jax.Array, state: GAState, params: GAParams):
        # pygad: sorted(range(P), key=fitness) then reversed, on the maximised fitness (here
        # -state.fitness): best first, equal fitness by descending index
        order = jnp.argsort(-state.fitness, stable=True)[::-1]
        ranked = state.population[order]
        parents = ranked[: self.num_parents]
        n_off = self.population_size - self.keep_parents
        k = jnp.arange(n_off)
        p1, p2 = parents[k % self.num_parents], parents[(k + 1) % self.num_parents]
        k_cut, k_pos, k_val = jax.random.split(key, 3)
        g = self.num_dims
        cut = jax.random.randint(k_cut, (n_off, 1), 0, g)
        children = jnp.where(jnp.arange(g)[None, :] < cut, p1, p2)
        if self.num_mutations > 0:
            noise = jax.random.uniform(k_pos, (n_off, g))
            _, pos = jax.lax.top_k(noise, self.num_mutations)  # distinct positions per child
            vals = jax.random.bernoulli(k_val, 0.5, (n_off, self.num_mutations)).astype(children.dtype)
            children = jax.vmap(lambda c, p, v: c.at[p].set(v))(children, pos, vals)
        return jnp.concatenate([ranked[: self.keep_parents], children]), state

    def _tell(self, key, population, fitness, state: GAState, params: GAParams) -> GAState:
        return state.replace(population=population, fitness=fitness)
