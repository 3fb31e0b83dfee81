"""Decompose your own Flax model: a Linen CNN shaped like the Flax MNIST example, trained on
Fashion-MNIST at 28x28 with a plain optax loop, adapted and split by GradSplitter.

    apt-get install dataset-fashion-mnist        # or: --dataset digits (bundled, resized)
    python examples/own_model.py                 # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import cnnsplit_jax as cs


class CNN(nn.Module):
    """The Flax MNIST example's CNN (``width`` scales its 32 / 64 channels and 256 units)."""

    width: float = 0.5

    @nn.compact
    def __call__(self, x):
        c1, c2, h = (max(1, int(v * self.width)) for v in (32, 64, 256))
        x = nn.avg_pool(nn.relu(nn.Conv(c1, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(c2, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(h)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=float, default=0.5)
    a = p.parse_args(argv)
    ds = cs.load_dataset(a.dataset)
    crop = lambda x: x[:, 2:30, 2:30]  # noqa: E731  (the loader pads 28x28 images to 32x32)
    n = min(a.train_images, len(ds.x_train))
    x_tr, y_tr = crop(ds.x_train[:n]), ds.y_train[:n]
    x_te, y_te = crop(ds.x_test), ds.y_test
    mean, std = float(x_tr.mean() / 255), float(x_tr.std() / 255)
    norm = lambda x: jnp.asarray((x / 255.0 - mean) / std, jnp.float32)  # noqa: E731

    # --- your training loop (plain optax) ---
    model_def = CNN(a.width)
    params = model_def.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, xb, yb):
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(model_def.apply(q, xb), yb).mean()  # noqa: E731
        upd, opt = tx.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, upd), opt

    t0 = time.perf_counter()
    for epoch in range(a.epochs):
        order = np.random.default_rng(epoch).permutation(n)
        for i in range(0, n - 63, 64):
            b = order[i:i + 64]
            params, opt = step(params, opt, norm(x_tr[b]), jnp.asarray(y_tr[b]))
    logits = np.concatenate([np.asarray(model_def.apply(params, norm(x_te[i:i + 1000]))) for i in range(0, len(x_te), 1000)])
    base = float((logits.argmax(1) == y_te).mean())
    train_s = time.perf_counter() - t0

    # --- the library: adapt, split, compose ---
    model = cs.adapt(model_def, params, input_shape=(28, 28, 1))
    cut = int(0.8 * n)
    data = cs.SplitData(x_tr[:cut], y_tr[:cut], x_tr[cut:], y_tr[cut:], (mean,), (std,))
    cfg = cs.GradSplitterConfig(head_epochs=1, modularity_epochs=9, cycle_mod=2, cycle_head=1,
                                lr_modularity=0.05, batch_size=64)
    t0 = time.perf_counter()
    res = cs.gradsplitter.split(jax.random.key(0), model, data, cfg)
    comp = cs.compose([cs.Pick(res.module_set, c) for c in range(10)])
    composed = float((cs.predict_scores(comp, x_te).argmax(1) == y_te).mean())
    out = {"dataset": a.dataset, "train_images": n, "mask_points": [[q.name, q.size] for q in model.mask_points()],
           "base_accuracy": base, "composed_accuracy": composed,
           "mean_kernel_retention": res.module_set.structure()["mean_kernel_retention"],
           "train_seconds": round(train_s, 1), "split_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
