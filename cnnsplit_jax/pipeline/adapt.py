"""A user's trained Flax model made into a run directory (``model.json`` + ``model/``, as
``cnnsplit train`` writes), so that ``split``, ``evaluate`` and ``compose`` take it like a
zoo model: its definition (an import path), its variables (a Flax msgpack file or an Orbax
directory), the dataset it classifies and the normalisation it was trained with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from .. import checkpoint as ckpt
from ..models import adapt, load_variables
from ..models.adapted_io import build_definition, linen_template
from ..train import accuracy
from ..data import fit_images
from .runs import exclusive, prepare_out, train_data

__all__ = ["adapt_run"]


@exclusive("out")
def adapt_run(out: str | Path, definition: str, dataset: str, *, variables: str | None = None,
              input_shape=None, ties="auto", apply_kwargs: dict | None = None, train_kwargs: dict | None = None,
              kind: str = "kernel",
              mean=None, std=None, data_dir=None, seed: int = 0, overwrite: bool = False) -> dict:
    """Adapt the model built by ``definition`` (``"package.module:name"``, see
    ``models.adapted_io``) with the trained ``variables`` (required for Linen; for NNX, the
    definition's own weights when None) for ``dataset`` (a name or task spec), and write it to
    the run directory ``out`` with its test accuracy (``adapt.json``).

    ``input_shape``: (H, W, C) the model reads (default: the dataset's images); smaller images
    are centre crops of the dataset's (Fashion-MNIST's 28x28 inside the loader's 32x32).
    ``mean``/``std``: the normalisation the model was trained with (default: the dataset's).
    ``train_kwargs``: a Linen model's training-forward arguments (``adapt``'s), recorded with it.
    ``seed``: of the train / validation split the splitters use. Returns the ``adapt.json`` dict.
    """
    out = Path(out)
    ds, sources = train_data(dataset, data_dir)
    shape = tuple(int(v) for v in (input_shape or ds.x_train.shape[1:]))
    net = build_definition(definition)
    kw = dict(apply_kwargs or {})
    if isinstance(net, nnx.Module):
        if variables is not None:
            net = load_variables(variables, net)
        net.eval()
        params = None
    else:
        if variables is None:
            raise ValueError(f"{definition!r} is a Linen module: pass its trained variables (--variables)")
        like = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), linen_template(net, shape, kw))
        params = load_variables(variables, like)
    model = adapt(net, params, input_shape=shape, num_classes=ds.info.num_classes, ties=ties, apply_kwargs=kw,
                  train_kwargs=train_kwargs, kind=kind, definition=definition)
    info = dataclasses.replace(ds.info, mean=tuple(mean or ds.info.mean), std=tuple(std or ds.info.std))
    if len(info.mean) != shape[-1] or len(info.std) != shape[-1]:
        raise ValueError(f"--mean/--std need {shape[-1]} values (one per channel), got {list(info.mean)} / {list(info.std)}")
    prepare_out(out, "adapted_model", overwrite=overwrite, in_progress=True, resumable=False)
    test_acc = accuracy(model, fit_images(ds.x_test, shape), ds.y_test, info)
    norm = info.normalization.to_json()
    ckpt.save_model(out, model, {
        "dataset": dataset, "sources": sources, "normalization": norm, "class_names": list(info.class_names),
        "test_accuracy": test_acc, "seed": seed, "split": {"seed": seed, "val_fraction": 0.2}})
    result = {"model": model.arch, "definition": definition, "dataset": dataset, "input_shape": list(shape),
              "test_accuracy": test_acc, "normalization": norm, "kind": kind,
              "mask_points": [[p.name, p.size, list(p.layers)] for p in model.mask_points()]}
    ckpt.write_json(out / "adapt.json", result)
    return result
