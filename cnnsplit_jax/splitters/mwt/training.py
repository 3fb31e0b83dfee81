"""MwT's modular training: a zoo model and its mask generators trained together (spec mwt.md,
"Loss" and "Training").

``MwTObjective`` is a ``train.Objective``: ``train.fit(model, ds, cfg, objective=MwTObjective())``
trains the model and one generator per ``generators.generator_layers(model)`` with
``CE + alpha * cohesion + beta * coupling``, validates the model *with* its generators, and
checkpoints / resumes both like any training. The reference's optimiser and schedule are the
``"mwt"`` recipe of ``train.RECIPES`` (SGD Nesterov 0.9, lr 0.05 for both, no weight decay,
cosine annealing over 200 epochs, the final epoch kept); ``"mwt-quick"`` is the same over 12
epochs with the best validation epoch kept.

On disk, the generators of a trained run sit next to its model (``save_generators``)::

    RUN_DIR/generators/    Orbax tree {layer: {"w1", "w2", "b2"}} (checksummed)
    RUN_DIR/model.json     ... "mwt": {"alpha", "beta", "layers": {layer: [C_in, C_out]}}

``load_generators`` rebuilds the template from the recorded shapes and refuses generators
whose layers or shapes do not match the model's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from ... import checkpoint as ckpt
from ...validate import finite
from .generators import generator_hidden, generator_layers, init_generators, sample_gates
from .losses import modular_loss

__all__ = ["MwTConfig", "MwTObjective", "GENERATORS_DIR", "save_generators", "load_generators", "generator_logits"]

GENERATORS_DIR = "generators"


@dataclasses.dataclass(frozen=True)
class MwTConfig:
    """The modular loss's weights (the reference's defaults): loss = CE + alpha * cohesion +
    beta * coupling."""

    alpha: float = 0.5
    beta: float = 1.5

    def __post_init__(self):
        finite("alpha", self.alpha, lo=0.0)
        finite("beta", self.beta, lo=0.0)


def generator_logits(model, gen_params: dict, x: jax.Array) -> jax.Array:
    """Logits [B, K] of ``model`` run in eval mode with its generators on normalised images x."""
    return model(x, sample_gates(gen_params))


@dataclasses.dataclass(frozen=True)
class MwTObjective:
    """MwT's objective for ``train.fit`` (see the module docstring); hashable, so it is a
    static argument of the jitted validation."""

    config: MwTConfig = MwTConfig()
    num_classes: None = None  # the model's own head

    @property
    def name(self) -> str:
        """The objective and its weights, as a resumed run must find them."""
        return f"mwt alpha={self.config.alpha:g} beta={self.config.beta:g}"

    def init(self, key: jax.Array, model) -> dict:
        return init_generators(key, model)

    def loss(self, model, extra, x, y, *, dropout_key, dropout: bool):
        return modular_loss(model, extra, x, y, alpha=self.config.alpha, beta=self.config.beta, train=True,
                            dropout_key=dropout_key, dropout=dropout)

    def logits(self, model, extra, x):
        return generator_logits(model, extra, x)


def _shapes(model, layers) -> dict:
    shapes = {n: [c_in, c_out] for n, c_in, c_out in model.gate_layers()}
    return {n: shapes[n] for n in layers}


def save_generators(run_dir: str | Path, model, gen_params: dict, config: MwTConfig) -> dict:
    """Write ``gen_params`` to ``run_dir/generators``; returns the ``"mwt"`` record for
    ``model.json`` (the caller writes it with the model)."""
    save = {p: {k: jnp.asarray(v, jnp.float32) for k, v in g.items()} for p, g in gen_params.items()}
    ckpt.save_tree(Path(run_dir) / GENERATORS_DIR, save)
    return {"alpha": config.alpha, "beta": config.beta, "layers": _shapes(model, sorted(gen_params))}


def load_generators(run_dir: str | Path, model, meta: dict) -> dict:
    """The generators saved in ``run_dir`` for ``model`` (``meta``: its ``model.json``).
    ``CheckpointError`` when the run has none, or their layers or shapes differ from the
    model's (a run trained without ``--method mwt``, or another model)."""
    run_dir = Path(run_dir)
    rec = meta.get("mwt")
    if not isinstance(rec, dict) or not isinstance(rec.get("layers"), dict):
        raise ckpt.CheckpointError(f"{run_dir} holds no MwT-trained model (no 'mwt' record in its model.json): "
                                   "train it with `cnnsplit train --method mwt`")
    expected = _shapes(model, sorted(generator_layers(model)))
    if {k: list(v) for k, v in rec["layers"].items()} != expected:
        raise ckpt.CheckpointError(f"{run_dir}: the saved generators are for the layers {rec['layers']}, the model needs "
                                   f"{expected}")
    template = {p: {"w1": jnp.zeros((c_in, generator_hidden(c_out)), jnp.float32),
                    "w2": jnp.zeros((generator_hidden(c_out), c_out), jnp.float32),
                    "b2": jnp.zeros((c_out,), jnp.float32)} for p, (c_in, c_out) in expected.items()}
    return ckpt.load_tree(run_dir / GENERATORS_DIR, template)

