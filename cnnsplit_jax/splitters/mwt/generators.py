"""MwT's mask generators: one per masked conv layer, deciding per sample which of the layer's
kernels are active (spec mwt.md, "Mask generator").

A generator reads the layer's *input* feature map x [B, H, W, C_in], averages it over space
(global average pooling) to [B, C_in], and maps it through ``Linear(C_in -> H, no bias) ->
ReLU -> Linear(H -> C_out, bias) -> relu(tanh(.))`` to a mask [B, C_out] in [0, 1). H is
C_out when C_out < 128, else C_out // 2. The weights start Kaiming-normal (PyTorch's
``kaiming_normal_`` default: fan-in, gain sqrt(2), std = sqrt(2 / fan_in)); the output bias
starts at 1.0, so every mask starts open (tanh(1) = 0.76). The mask multiplies the layer's
BatchNorm output per channel before its ReLU; since the mask is >= 0, that equals multiplying
the ReLU's output, which is where the zoo's models apply kernel masks.

Parameters are a pytree ``{"w1": [C_in, H], "w2": [H, C_out], "b2": [C_out]}`` (``x @ w``:
PyTorch's ``Linear.weight`` transposed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["generator_hidden", "init_generator", "generator_mask", "generator_layers",
           "init_generators", "sample_gates"]


def generator_hidden(c_out: int) -> int:
    """Hidden width of a generator for a layer of ``c_out`` kernels: C_out below 128, else half."""
    if c_out < 1:
        raise ValueError(f"a mask generator needs at least one output kernel, got {c_out}")
    return c_out if c_out < 128 else c_out // 2


def init_generator(key: jax.Array, c_in: int, c_out: int, dtype=jnp.float32) -> dict:
    """Fresh generator parameters for a layer reading ``c_in`` channels with ``c_out`` kernels."""
    if c_in < 1:
        raise ValueError(f"a mask generator needs at least one input channel, got {c_in}")
    h = generator_hidden(c_out)
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (c_in, h), dtype) * jnp.sqrt(2.0 / c_in).astype(dtype),
            "w2": jax.random.normal(k2, (h, c_out), dtype) * jnp.sqrt(2.0 / h).astype(dtype),
            "b2": jnp.ones((c_out,), dtype)}


def generator_mask(params: dict, x: jax.Array) -> jax.Array:
    """Per-sample kernel masks [B, C_out] in [0, 1) from a layer input x [B, H, W, C_in] (NHWC)."""
    if x.ndim != 4 or x.shape[-1] != params["w1"].shape[0]:
        raise ValueError(f"a generator for {params['w1'].shape[0]} input channels got an input of shape "
                         f"{tuple(x.shape)} (expected [B, H, W, {params['w1'].shape[0]}])")
    pooled = x.mean(axis=(1, 2))
    h = jax.nn.relu(pooled @ params["w1"])
    return jax.nn.relu(jnp.tanh(h @ params["w2"] + params["b2"]))


def generator_layers(model) -> tuple[str, ...]:
    """The conv layers that get a generator: ``model.gate_layers()``, every conv reading another
    conv's output (a layer reading the image has none, as the reference's first conv). Each
    layer of a tied pair (ResCNN's residual pairs) gets its own generator, as in the
    reference's MwT ResCNN, where every conv is a ``MaskConvBN``; for an adapted model, every
    masked conv but the first."""
    return tuple(name for name, _, _ in model.gate_layers())


def init_generators(key: jax.Array, model) -> dict:
    """``{layer: generator params}`` for ``generator_layers(model)``, each from its own key."""
    layers = model.gate_layers()
    keys = jax.random.split(key, max(len(layers), 1))
    return {n: init_generator(k, c_in, c_out) for (n, c_in, c_out), k in zip(layers, keys)}


def sample_gates(params: dict):
    """``SampleGates`` running the generators ``params`` ({layer: params}) in a forward pass;
    after the pass its ``masks`` holds every gated layer's per-sample masks [B, C]."""
    from ...models import SampleGates

    return SampleGates(lambda layer, x: generator_mask(params[layer], x), tuple(params))
