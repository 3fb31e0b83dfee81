"""Trained models on disk: ``save_model`` / ``load_model``.

Layout of a run directory::

    RUN_DIR/model.json     metadata: arch, width, num_classes, in_channels, fc_hidden,
                           dataset, normalisation (mean, std), accuracies, ...
    RUN_DIR/model/         the model's variables (``trees.save_tree``, checksummed)

An adapted model (``cnnsplit_jax.adapt``: a user's own Flax CNN) is saved as its variables and
its ``spec()``, whose ``definition`` names the user's code that rebuilds the structure.
Loading such a model **imports and calls that code**, so it needs the caller's opt-in:
``trust_definition=True`` (the CLI's ``--trust-definition``), or the definition given again
by the caller (``trust_definition="package.module:name"``). Without it, ``load_model`` raises
``UntrustedDefinitionError`` and imports nothing; ``read_model_meta`` reads the metadata alone.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from flax import nnx

from ..models import adapt, build_model
from ..models.protocol import SplittableModel
from ..models.adapted_io import rebuild, variables_of
from ..models.intercept import AdapterError
from ..progress import RunWarning
from .trees import CheckpointError, load_tree, read_json, save_tree, write_json

__all__ = ["save_model", "load_model", "read_model_meta", "UntrustedDefinitionError", "MODEL_JSON", "MODEL_DIR"]

MODEL_JSON = "model.json"
MODEL_DIR = "model"


class UntrustedDefinitionError(CheckpointError):
    """Loading the artefact would import and call code it names, and the caller did not opt in."""


def save_model(run_dir: str | os.PathLike, model: SplittableModel, meta: dict | None = None) -> None:
    """Write ``model`` (params + BN stats) and ``meta`` to ``run_dir``. An adapted model
    (``cnnsplit_jax.adapt``) is written as its user's variables and ``spec()`` (the
    definition it is rebuilt from, the mask points as adapted)."""
    run_dir = Path(run_dir)
    spec = model.definition_spec()
    if spec is not None:
        if model.definition is None:
            raise CheckpointError(
                f"{model.arch} cannot be saved without its definition: pass definition='package.module:name' "
                "(a callable with no arguments returning the model) to cnnsplit_jax.adapt")
        save_tree(run_dir / MODEL_DIR, variables_of(model))
        write_json(run_dir / MODEL_JSON, {**model.config(), "adapted": spec, **(meta or {})})
        return
    save_tree(run_dir / MODEL_DIR, nnx.state(model))
    write_json(run_dir / MODEL_JSON, {**model.config(), **(meta or {})})


def read_model_meta(run_dir: str | os.PathLike) -> dict:
    """The metadata (``model.json``) of the model saved in ``run_dir``, without loading it."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_JSON).is_file() or not (run_dir / MODEL_DIR).is_dir():
        raise CheckpointError(
            f"no model checkpoint in {run_dir} (expected {MODEL_JSON} and {MODEL_DIR}/ as "
            f"written by `cnnsplit train`)"
        )
    return read_json(run_dir / MODEL_JSON)


def load_model(run_dir: str | os.PathLike, *, trust_definition: bool | str = False) -> tuple[SplittableModel, dict]:
    """Rebuild the model saved in ``run_dir``; returns ``(model, metadata)``.

    Args:
      trust_definition: for an adapted model only (a zoo model never runs code it reads):
        True imports and calls the definition recorded in ``model.json``; a string
        ``"package.module:name"`` imports that definition instead (the caller names the code);
        False (default) refuses to import anything.

    Raises:
      UntrustedDefinitionError: an adapted model and no opt-in (nothing was imported).
      CheckpointError: no checkpoint there, or it is corrupt / inconsistent with its metadata.
    """
    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir)
    if "adapted" in meta:
        return _load_adapted(run_dir, meta, trust_definition), meta
    try:
        kwargs = {k: meta[k] for k in ("num_classes", "in_channels", "width")}
        if meta.get("fc_hidden"):  # SimCNN's FC width
            kwargs["fc_hidden"] = meta["fc_hidden"]
        if meta.get("channels") is not None:  # an extracted (pruned) model
            kwargs["channels"] = _channels(meta["channels"])
        # abstract model (no random init): every variable is then restored from disk
        model = nnx.eval_shape(lambda: build_model(meta["arch"], **kwargs))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"bad metadata in {run_dir / MODEL_JSON}: {e}") from None
    state = load_tree(run_dir / MODEL_DIR, nnx.state(model))
    nnx.update(model, state)
    return model, meta


def _channels(spec) -> dict[str, int]:
    """``model.json``'s ``channels`` (``{layer: C_out}``, positive ints), else ValueError."""
    if not isinstance(spec, dict) or not all(isinstance(k, str) and type(v) is int and v >= 1
                                             for k, v in spec.items()):
        raise ValueError(f"'channels' must map layer names to positive channel counts, got {spec!r}")
    return spec


def _definition(run_dir: Path, spec: dict, trust: bool | str) -> str:
    """The definition to import for the adapted model saved in ``run_dir``, or raise."""
    saved = spec.get("definition")
    if isinstance(trust, str) and trust:
        if trust != saved:
            warnings.warn(f"{run_dir}: rebuilding with the definition {trust!r} you gave, not the recorded "
                          f"{saved!r}", RunWarning, stacklevel=4)
        return trust
    if trust is True:
        if not isinstance(saved, str):
            raise CheckpointError(f"bad metadata in {run_dir / MODEL_JSON}: the adapted model records no definition")
        warnings.warn(f"loading {run_dir} imports and calls {saved!r} (recorded there; trusted by the caller)",
                      RunWarning, stacklevel=4)
        return saved
    mod, _, name = str(saved).partition(":")
    raise UntrustedDefinitionError(
        f"{run_dir} holds an adapted model: loading it would import the module {mod!r} and call {name}() "
        f"(the definition {saved!r} recorded there). If you trust this artefact, pass --trust-definition "
        "(trust_definition=True), or name the definition yourself (trust_definition='package.module:name')")


def _load_adapted(run_dir: Path, meta: dict, trust: bool | str):
    spec = meta["adapted"]
    if not isinstance(spec, dict) or not isinstance(spec.get("points"), list):
        raise CheckpointError(f"bad metadata in {run_dir / MODEL_JSON}: 'adapted' is not an adapted model's spec")
    definition = _definition(run_dir, spec, trust)
    try:
        net, variables = rebuild({**spec, "definition": definition},
                                 lambda template: load_tree(run_dir / MODEL_DIR, template))
        points = spec["points"]
        model = adapt(net, variables, input_shape=spec["input_shape"], num_classes=spec["num_classes"],
                      mask_points=[c for _, layers in points for c in layers], ties=[ls for _, ls in points if len(ls) > 1],
                      apply_kwargs=spec.get("apply_kwargs") or {}, train_kwargs=spec.get("train_kwargs"),
                      name=spec.get("name"), kind=spec["kind"], definition=definition,
                      placements=spec.get("placements"), verify=False)
    except AdapterError as e:
        raise CheckpointError(f"cannot rebuild the adapted model of {run_dir}: {e}") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"bad metadata in {run_dir / MODEL_JSON}: {type(e).__name__}: {e}") from None
    if [[p.name, list(p.layers)] for p in model.mask_points()] != points:
        raise CheckpointError(f"{run_dir}: the definition {definition!r} no longer has the saved mask points "
                              f"{[n for n, _ in points]}")
    return model
