"""What ``adapt`` checks before it returns a user's model, so that no mask point or node is
quietly wrong:

* ``check_call``: the model is called as it was trained to infer (NNX layers in eval mode,
  Linen variables wrapped in their collections and of this model's structure), and
  ``explain`` turns Flax's own failures (training-mode BatchNorm, a missing ``train``
  argument, a wrong input shape, another model's variables) into an ``AdapterError`` that
  says what to pass.
* ``failing_points``: for each mask point, masking its most active channel on a probe input
  gives the same logits as the user's model with that kernel (and the norm channel the point
  lies after) zeroed. A point lies after the norm that reads its conv; when the conv's raw
  output also reaches something else (a pre-activation block's identity shortcut) or the norm
  mixes channels (LayerNorm, GroupNorm), it does not, and ``adapt`` moves the point to the
  conv's output, where masking always equals zeroing the kernel.
* ``relu_inputs`` (``ties``): concern identification reads a node as the input of a ReLU.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .intercept import AdapterError

__all__ = ["check_call", "check_training_call", "explain", "failing_points"]

#: Linen variable collections (the keys of ``module.init(...)``'s result)
_COLLECTIONS = ("params", "batch_stats", "cache", "intermediates", "constants")


def _paths(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def check_call(net, variables, input_shape, apply_kwargs) -> None:
    """Raise ``AdapterError`` when ``net`` would not run as a trained model at inference: an NNX
    BatchNorm or Dropout in training mode; Linen variables without their collections, or not
    of this model's structure (missing, unexpected or reshaped entries)."""
    if isinstance(net, nnx.Module):
        for path, m in nnx.iter_modules(net):
            where = "/".join(map(str, path)) or type(net).__name__
            if isinstance(m, nnx.BatchNorm) and m.use_running_average is False:
                raise AdapterError(f"the nnx.BatchNorm at {where!r} is in training mode (batch statistics): call "
                                   "model.eval() before adapting it, so it reads its running averages")
            if isinstance(m, nnx.Dropout) and m.deterministic is False:
                raise AdapterError(f"the nnx.Dropout at {where!r} is active (training mode): call model.eval() "
                                   "before adapting it")
        return
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables)[:4] if isinstance(variables, Mapping) else type(variables).__name__
        raise AdapterError(f"Linen variables are a dict of collections, {{'params': ..., 'batch_stats': ...}} as "
                           f"module.init returns them; got {keys}: if these are the parameters alone, pass "
                           "{'params': params}")
    extra = [k for k in variables if k not in _COLLECTIONS]
    if extra:
        raise AdapterError(f"unknown variable collections {extra}: pass the variables as module.init returns them")
    x = jnp.zeros((1, *input_shape), jnp.float32)
    try:
        want = jax.eval_shape(lambda: net.init(jax.random.key(0), x, **dict(apply_kwargs or {})))
    except Exception as e:
        raise AdapterError(explain(e, input_shape)) from e
    have, need = _paths({k: v for k, v in variables.items() if k in want}), _paths(dict(want))
    missing = [p for p in need if p not in have]
    unexpected = [p for p in have if p not in need]
    reshaped = [f"{p} {have[p]} (the model has {need[p]})" for p in need if p in have and have[p] != need[p]]
    if missing or unexpected or reshaped:
        what = "; ".join(f"{label}: {', '.join(items[:3])}" + (" ..." if len(items) > 3 else "")
                         for label, items in (("missing", missing), ("not in the model", unexpected),
                                              ("other shapes", reshaped)) if items)
        raise AdapterError(f"the variables are not this model's ({what}); pass the variables it was trained with, "
                           f"and the input_shape {tuple(input_shape)} it was trained on")


def check_training_call(net, variables, input_shape, train_kwargs) -> None:
    """Raise ``AdapterError`` unless ``train_kwargs`` (None: nothing to check) make a Linen
    model's training forward: only for Linen (an NNX model trains by switching its
    ``nnx.BatchNorm`` layers); applied with ``mutable=["batch_stats"]`` (and a dropout key) it
    must run on two images of ``input_shape``, give logits [B, K] and, where the model has
    running statistics, change them (else its BatchNorms would still read their averages)."""
    if train_kwargs is None:
        return
    if isinstance(net, nnx.Module):
        raise AdapterError("train_kwargs are a Linen model's call arguments for its training forward; an NNX model "
                           "trains by switching its nnx.BatchNorm layers to batch statistics by itself: leave them out")
    x = jax.random.normal(jax.random.key(0), (2, *input_shape), jnp.float32)
    try:
        out, updates = net.apply(variables, x, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)},
                                 **dict(train_kwargs))
    except Exception as e:
        raise AdapterError(f"the training forward with train_kwargs={dict(train_kwargs)} fails: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    before = variables.get("batch_stats", {})
    moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                          jax.tree.leaves(updates.get("batch_stats", {}))))
    if jax.tree.leaves(before) and not moved:
        raise AdapterError(f"train_kwargs={dict(train_kwargs)} leave the BatchNorm running statistics unchanged: "
                           "pass the arguments that put your model in training mode (e.g. {'train': True})")
    if np.ndim(out) != 2:
        raise AdapterError(f"the training forward with train_kwargs={dict(train_kwargs)} gives an output of shape "
                           f"{np.shape(out)}, not logits [B, K]")


def explain(e: Exception, input_shape) -> str:
    """One message for a failed forward pass of a user's model, saying what to pass."""
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    shape = ", ".join(map(str, input_shape))
    low = text.lower()
    if "batch_stats" in low and ("immutable" in low or "mutable" in low):
        hint = ("a BatchNorm runs in training mode (it updates batch_stats): pass apply_kwargs={'train': False} "
                "(or the argument your model uses) so it reads its running averages")
    elif "missing" in low and "argument" in low:
        hint = "the model's __call__ needs more arguments: pass them in apply_kwargs, e.g. {'train': False}"
    elif "argument" in low:
        hint = "apply_kwargs do not match the arguments of the model's __call__: pass the ones it takes"
    elif "rng" in low and "dropout" in low:
        hint = "a Dropout is active: pass apply_kwargs that put the model in inference mode, e.g. {'train': False}"
    elif any(w in low for w in ("shape", "dimension", "incompatible", "size")):
        hint = f"the model cannot read images [1, {shape}]: pass the input_shape (H, W, C) it was trained on"
    else:
        hint = f"running the model on an input of shape [1, {shape}] failed"
    return f"{hint} ({text})"


def failing_points(model, *, batch: int = 1, tol: float = 1e-5) -> list[tuple[str, float]]:
    """``[(point, max |difference|)]`` of the mask points where masking one channel does not
    equal the model with that kernel zeroed (see the module docstring), on a random probe
    batch. The channel tried is the point's most active one (a dead channel would agree
    vacuously). Both sides run in one vmapped forward pass."""
    points = list(model.mask_points())
    if not points:
        return []
    x = jax.random.normal(jax.random.key(0), (batch, *model.input_shape), jnp.float32)
    where, conv_of, norm_of = model._where, {}, {}
    for p in points:
        for conv in p.layers:
            conv_of[conv] = p.name
            at = model.placement_layer(conv)
            if at != conv:
                norm_of[at] = p.name
    activity = {}

    def record(path, kind, layer, xin, out):
        if path in where:
            activity[where[path]] = jnp.abs(out).mean(tuple(range(out.ndim - 1)))
        return out

    base = model._run(x, record)
    ones = {p.name: jnp.ones((len(points), p.size), jnp.float32) for p in points}
    drop = dict(ones)
    for i, p in enumerate(points):
        c = int(jnp.argmax(activity[p.name])) if p.name in activity else 0
        drop[p.name] = drop[p.name].at[i, c].set(0.0)

    def run(at_point, at_layers):
        def fn(path, kind, layer, xin, out):
            for table in (conv_of, norm_of):
                if path in table:
                    out = out * at_layers[table[path]].astype(out.dtype)
            return out * at_point[where[path]].astype(out.dtype) if path in where else out

        return model._run(x, fn)

    both = jax.vmap(run)({k: jnp.concatenate([v, ones[k]]) for k, v in drop.items()},
                         {k: jnp.concatenate([ones[k], v]) for k, v in drop.items()})
    n = len(points)
    diff = np.asarray(jnp.abs(both[:n] - both[n:]).max(axis=(1, 2)))
    bound = tol * (1.0 + float(jnp.abs(base).max()))
    return [(p.name, float(d)) for p, d in zip(points, diff) if d > bound]
