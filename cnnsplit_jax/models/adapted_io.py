"""A user's model on disk: restoring their trained parameters (``load_variables``: a Flax
msgpack file or an Orbax directory), and the *definition* an adapted model is rebuilt from
(``definition_of``, ``build_definition``, ``rebuild``), so that a module set of an adapted
model is saved and loaded like one of the zoo (``checkpoint.save_model``).

A definition is an import path ``"package.module:name"`` of a callable with no arguments that
returns the model's structure: an ``nnx.Module`` (its variables are then replaced by the saved
ones) or a Linen module (applied with the saved variables). A Linen module whose class is
importable and built with default fields is its own definition.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from .intercept import AdapterError

__all__ = ["load_variables", "definition_of", "build_definition", "variables_of", "linen_template", "rebuild"]


def definition_of(net, definition: str | None) -> str | None:
    """The definition recorded for ``net``: ``definition`` checked (importable, callable; not
    called), or, when None, the Linen class itself when ``type(net)()`` equals ``net``; else None."""
    if definition is not None:
        _resolve(definition)
        return definition
    cls = type(net)
    if isinstance(net, nn.Module) and cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__:
        try:
            if cls() == net:
                return f"{cls.__module__}:{cls.__qualname__}"
        except Exception:  # fields without defaults
            return None
    return None


def _resolve(definition: str):
    """The callable ``definition`` names, or raise ``AdapterError``."""
    mod, sep, name = str(definition).partition(":")
    if not sep or not mod or not name:
        raise AdapterError(f"a model definition is 'package.module:name', got {definition!r}")
    try:
        obj = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise AdapterError(f"cannot import the model definition {definition!r}: {type(e).__name__}: {e} "
                           "(is its package on PYTHONPATH?)") from None
    if not callable(obj):
        raise AdapterError(f"the model definition {definition!r} is not callable")
    return obj


def build_definition(definition: str):
    """The model structure that ``definition`` (``"package.module:name"``) builds.

    Raises:
      AdapterError: a malformed path, a module or name that cannot be imported, or a call
        that does not return an NNX or Linen module.
    """
    net = _resolve(definition)()
    if not isinstance(net, (nnx.Module, nn.Module)):
        raise AdapterError(f"the model definition {definition!r} returned a {type(net).__name__}, "
                           "not an NNX or Linen module")
    return net


def variables_of(model) -> dict:
    """The trained variables of an adapted model as a pytree of arrays (Linen: its
    ``{"params": ..., ...}``; NNX: the pure dict of ``nnx.state``)."""
    if model.linen:
        return model.linen_variables()
    return nnx.state(model.net).to_pure_dict()


def linen_template(net, input_shape, apply_kwargs=None):
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of a Linen module's variables for images
    ``[1, *input_shape]``, without initialising them."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda: net.init(jax.random.key(0), x, **dict(apply_kwargs or {})))


def rebuild(spec: dict, load):
    """The ``(net, variables)`` of an adapted model saved with ``spec`` (``AdaptedCNN.spec()``),
    its variables restored by ``load(template)`` (a pytree of arrays or shape structs)."""
    net = build_definition(spec["definition"])
    if isinstance(net, nnx.Module):
        state = nnx.state(net)
        restored = load(state.to_pure_dict())
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(net, state)
        if hasattr(net, "eval"):
            net.eval()
        return net, None
    return net, load(linen_template(net, spec["input_shape"], spec.get("apply_kwargs")))


def _pure(tree):
    return jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, tree,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def load_variables(path, like):
    """A user's trained parameters, from a Flax msgpack file (``flax.serialization.to_bytes``
    of the variables, or of ``nnx.state(model)``'s pure dict) or an Orbax checkpoint directory
    (a pytree saved with ``orbax.checkpoint``), checked against ``like``.

    Args:
      path: a file (msgpack) or a directory (Orbax).
      like: Linen variables of the right structure (e.g. ``module.init(...)``), or an NNX
        module, which is updated in place.

    Returns:
      the restored Linen variables, or the updated NNX module.

    Raises:
      AdapterError: no such file or directory, unreadable data, or a tree whose structure or
        shapes differ from ``like``'s.
    """
    import os

    import orbax.checkpoint as ocp
    from flax import serialization

    path = os.fspath(path)
    target = nnx.state(like).to_pure_dict() if isinstance(like, nnx.Module) else _pure(like)
    try:
        if os.path.isdir(path):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = ocp.v1.load(path)
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                got = serialization.msgpack_restore(f.read())
        else:
            raise AdapterError(f"no checkpoint at {path} (a msgpack file or an Orbax directory)")
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"cannot read a checkpoint at {path}: {type(e).__name__}: {e}") from e
    got = jax.tree.map(jnp.asarray, got)
    want_t, got_t = jax.tree.structure(serialization.to_state_dict(target)), jax.tree.structure(got)
    if want_t != got_t:
        raise AdapterError(f"the checkpoint at {path} does not have the model's structure: expected {want_t}, "
                           f"found {got_t}")
    bad = [f"{jax.tree_util.keystr(k)}: {a.shape} vs {b.shape}"
           for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(serialization.to_state_dict(target)),
                                jax.tree.leaves(got)) if a.shape != b.shape]
    if bad:
        raise AdapterError(f"the checkpoint at {path} has other shapes than the model: {bad[:5]}")
    restored = serialization.from_state_dict(target, got)
    if isinstance(like, nnx.Module):
        state = nnx.state(like)
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(like, state)
        return like
    return restored
