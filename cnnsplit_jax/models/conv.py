"""Convolution and pooling that pick the fastest correct formulation per layer shape.

XLA:CPU runs some convolution shapes far below the machine's speed (a 3x3 "SAME" conv on
2x2x512 maps is ~100x slower than a matmul doing the same work, see
``shared/spec/performance-notes.md``). On tiny feature maps a convolution is exactly a dense
matrix product: every output position sees a fixed subset of the input positions, so

    y[b, (p, co)] = sum_{(q, ci)} x[b, (q, ci)] * T[(q, ci), (p, co)]

with ``T`` built from the kernel taps (zeros where a tap falls outside the map). ``unrolled``
computes that product; it does *no* wasted work on padding, unlike im2col. ``im2col`` gathers
the k*k shifted copies and does one matmul. ``native`` is ``lax.conv_general_dilated``.

``impl="auto"`` chooses per static shape (``select_conv_impl``) on the CPU backend, and is always
``native`` on GPU/TPU, where cuDNN/XLA handle these shapes well. The rule comes from the
per-layer table of ``benchmarks/bench_models.py --layers`` (in the README).
All formulations agree with the native convolution to float32 tolerance (tests/test_conv.py).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "conv2d",
    "select_conv_impl",
    "max_pool_2x2",
    "CONV_IMPLS",
    "UNROLL_MAX_POSITIONS",
    "UNROLL_MAX_BYTES",
]

CONV_IMPLS = ("auto", "native", "im2col", "unrolled")
UNROLL_MAX_POSITIONS = 4
UNROLL_MAX_BYTES = 128 * 2**20


def _default_impl() -> str:
    impl = os.environ.get("CNNSPLIT_CONV_IMPL", "auto")
    if impl not in CONV_IMPLS:
        raise ValueError(f"CNNSPLIT_CONV_IMPL={impl!r}; expected one of {CONV_IMPLS}")
    return impl


def select_conv_impl(
    height: int, width: int, cin: int, cout: int, ksize: int, backend: str | None = None
) -> str:
    """Formulation ``auto`` uses for a ``ksize`` x ``ksize`` SAME conv on [H, W, cin] -> cout.

    CPU rule (from the per-layer table in the README, batch 64 and 640):
      * ``ksize == 1``: ``im2col`` (it is a plain matmul; ~2x faster than native);
      * H*W <= ``UNROLL_MAX_POSITIONS`` (2x2 and 1x1 maps): ``unrolled`` (native is 50-130x slower);
      * H*W <= 16 with ``ksize >= 5`` (InceCNN's 5x5 branch on 4x4): ``unrolled`` (10x);
      * otherwise ``native``.
    An unrolled matrix larger than ``UNROLL_MAX_BYTES`` falls back to ``im2col``.
    GPU/TPU: always ``native``.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "native"
    if ksize == 1:
        return "im2col"
    hw = height * width
    small = hw <= UNROLL_MAX_POSITIONS or (hw <= 16 and ksize >= 5)
    if small:
        return "unrolled" if hw * cin * hw * cout * 4 <= UNROLL_MAX_BYTES else "im2col"
    return "native"


def _native(x, w):
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _im2col(x, w):
    k = w.shape[0]
    pad = (k - 1) // 2
    b, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
    cols = [xp[:, dy : dy + h, dx : dx + wd, :] for dy in range(k) for dx in range(k)]
    patches = jnp.concatenate(cols, axis=-1)  # [B, H, W, k*k*C], tap-major like w.reshape
    return patches.reshape(b * h * wd, k * k * c).dot(w.reshape(k * k * c, -1)).reshape(
        b, h, wd, -1
    )


def _unroll_index(h: int, wd: int, k: int):
    """Static gather plan: for each (input pos q, output pos p) the flat tap index or -1."""
    pad = (k - 1) // 2
    hw = h * wd
    taps = np.full((hw, hw), -1, dtype=np.int32)
    for py in range(h):
        for px in range(wd):
            for qy in range(h):
                for qx in range(wd):
                    dy, dx = qy - py + pad, qx - px + pad
                    if 0 <= dy < k and 0 <= dx < k:
                        taps[qy * wd + qx, py * wd + px] = dy * k + dx
    return taps


def _unrolled(x, w):
    k, _, cin, cout = w.shape
    b, h, wd, _ = x.shape
    hw = h * wd
    taps = _unroll_index(h, wd, k)
    used = sorted(set(taps[taps >= 0].tolist()))
    if len(used) == 1 and hw == 1:  # 1x1 map: only the centre tap sees data
        t = used[0]
        return x.reshape(b, cin).dot(w.reshape(k * k, cin, cout)[t]).reshape(b, 1, 1, cout)
    wf = jnp.concatenate([w.reshape(k * k, cin, cout), jnp.zeros((1, cin, cout), w.dtype)])
    idx = np.where(taps >= 0, taps, k * k)  # the extra zero block for missing taps
    mat = wf[idx]  # [HW_q, HW_p, cin, cout]
    mat = mat.transpose(0, 2, 1, 3).reshape(hw * cin, hw * cout)
    return x.reshape(b, hw * cin).dot(mat).reshape(b, h, wd, cout)


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array | None = None, impl: str | None = None,
           stride: int = 1, padding: str = "same"):
    """SAME convolution (TensorFlow/Keras "same" padding for ``stride`` > 1), or VALID.

    Args:
      x: input [B, H, W, Cin] (NHWC).
      w: kernel [k, k, Cin, Cout] (HWIO), k odd.
      b: optional bias [Cout].
      impl: one of ``CONV_IMPLS``; ``None`` reads ``$CNNSPLIT_CONV_IMPL`` (default ``auto``).
      stride: spatial stride (ResNet's down-sampling convs use 2).
      padding: ``"same"``, ``"torch"`` (PyTorch's ``padding=k // 2`` on every side: at stride 1
        the same as ``"same"``; at stride 2 with k = 3 one more row / column on the top / left than
        TensorFlow's SAME) or ``"valid"`` (no padding, stride 1, always the native convolution).

    Returns:
      [B, ceil(H / stride), ceil(W / stride), Cout] (SAME); [B, (H - 1) // stride + 1, ..] (torch,
      odd k); [B, H - k + 1, W - k + 1, Cout] (VALID).
    """
    if x.ndim != 4 or w.ndim != 4 or x.shape[-1] != w.shape[2]:
        raise ValueError(
            f"conv2d expects x [B,H,W,Cin] and w [k,k,Cin,Cout] with matching Cin; "
            f"got x {x.shape}, w {w.shape}"
        )
    impl = impl or _default_impl()
    if padding == "valid":
        if stride != 1:
            raise ValueError("conv2d: valid padding supports stride 1 only")
        y = jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if b is None else y + b
    if padding == "torch" and stride != 1:  # PyTorch's padding=k//2 on every side
        k = w.shape[0] // 2
        y = jax.lax.conv_general_dilated(x, w, window_strides=(stride, stride), padding=((k, k), (k, k)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if b is None else y + b
    if padding not in ("same", "torch"):  # stride 1, odd k: "torch" is "same"
        raise ValueError(f"conv2d: padding {padding!r}; expected 'same', 'torch' or 'valid'")
    if stride != 1:
        if w.shape[0] == 1 and impl != "native":  # 1x1 strided = subsample, then a matmul
            return conv2d(x[:, ::stride, ::stride, :], w, b, "im2col")
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=(stride, stride), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if b is None else y + b
    if impl == "auto":
        impl = select_conv_impl(x.shape[1], x.shape[2], w.shape[2], w.shape[3], w.shape[0])
    if impl == "native":
        y = _native(x, w)
    elif impl == "im2col":
        y = _im2col(x, w)
    elif impl == "unrolled":
        y = _unrolled(x, w)
    else:
        raise ValueError(f"unknown conv impl {impl!r}; expected one of {CONV_IMPLS}")
    return y if b is None else y + b


def _pool(x):
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even H and W, got {x.shape}")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool on [B, H, W, C] (H, W even), as reshape + max (measured faster
    than ``reduce_window`` on XLA:CPU; identical results).

    Gradient: each window's whole gradient goes to its *first* maximum in row-major order,
    as PyTorch's ``max_pool2d`` and XLA's ``select_and_scatter`` do. (Differentiating the
    reshape + max would split it evenly among tied maxima; ties are common here: a masked
    kernel's window is all zeros, and those are exactly the gradients that decide whether a
    dropped kernel comes back in GradSplitter.)
    """
    return _pool(x)


def _pool_fwd(x):
    return _pool(x), x


def _pool_bwd(x, g):
    b, h, w, c = x.shape
    # windows as the last axis, in row-major order: (0, 0), (0, 1), (1, 0), (1, 1)
    win = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
    first = jax.nn.one_hot(jnp.argmax(win, axis=-1), 4, dtype=g.dtype)  # argmax: first maximum
    dx = (first * g[..., None]).reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return (dx.reshape(b, h, w, c),)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)
