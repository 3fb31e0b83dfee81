"""The training loop (``fit``) and evaluation (``predict``, ``accuracy``): optional flip +
crop(32, pad 4) augmentation, BN batch statistics, cross-entropy or a pluggable ``Objective``
(MwT's modular loss, a new head); after each epoch the model is evaluated on a validation
split and the best (>=, later ties win, as the reference) is kept. ``fit`` checkpoints every
epoch and resumes bit-identically from the last checkpoint.

Library code reports progress only through ``cnnsplit_jax.progress`` callbacks (stage
``"step"`` and ``"epoch"``); the CLI draws the bars.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Protocol
from pathlib import Path
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from .. import checkpoint as ckpt
from .. import mesh as meshlib
from ..data import Dataset, DatasetInfo, Normalization, batches, map_batches, normalize, split_indices
from ..models import count_params, total_kernels
from ..models.protocol import SplittableModel
from ..progress import Progress, callbacks_of, notify
from .config import TrainConfig, dirichlet_settings, make_optimizer

__all__ = [
    "summary",
    "Objective",
    "augment",
    "validation_images",
    "check_compatible",
    "predict",
    "accuracy",
    "objective_accuracy",
    "fit",
    "FitResult",
    "TrainingDivergedError",
]


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is left intact."""


def augment(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
    """Random horizontal flip then random crop (zero padding ``pad``) of images [B, H, W, C]."""
    b, h, w, _ = x.shape
    kf, ky, kx = jax.random.split(key, 3)
    flip = jax.random.bernoulli(kf, 0.5, (b,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = jax.random.randint(ky, (b,), 0, 2 * pad + 1)
    ox = jax.random.randint(kx, (b,), 0, 2 * pad + 1)
    crop = lambda img, y0, x0: jax.lax.dynamic_slice(img, (y0, x0, 0), (h, w, img.shape[-1]))  # noqa: E731
    return jax.vmap(crop)(xp, oy, ox)


def check_compatible(model: SplittableModel, info: DatasetInfo, num_classes: int | None = None) -> None:
    """Raise ``ValueError`` when the dataset's classes or channels differ from the model's
    (``num_classes``: the classes the trained output has, when not the model's own)."""
    classes = model.num_classes if num_classes is None else num_classes
    if info.num_classes != classes:
        raise ValueError(
            f"class count mismatch: model has {classes} classes, dataset "
            f"{info.name!r} has {info.num_classes}"
        )
    if info.channels != model.in_channels:
        raise ValueError(
            f"channel mismatch: model takes {model.in_channels}-channel images, dataset "
            f"{info.name!r} has {info.channels}"
        )


@jax.jit
def _logits(model, x_u8, mean, std):
    return model(normalize(x_u8, mean, std))


def predict(model: SplittableModel, x: np.ndarray, norm, batch_size: int = 512):
    """Logits [N, num_classes] for uint8 images x [N, 32, 32, C] (eval mode, batched);
    ``norm``: a ``data.Normalization`` or anything ``Normalization.of`` reads (a
    ``DatasetInfo``, ...)."""
    mean, std = (jnp.asarray(v) for v in Normalization.of(norm))
    return map_batches(lambda xb: _logits(model, jnp.asarray(xb), mean, std), [x], batch_size, pad=False)


def accuracy(model: SplittableModel, x: np.ndarray, y: np.ndarray, norm, batch_size=512):
    """Exact top-1 accuracy (fraction correct over all images); ``norm`` as ``predict``'s."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= model.num_classes):
        raise ValueError(
            f"labels must lie in [0, {model.num_classes}); got range [{y.min()}, {y.max()}]"
        )
    return float((predict(model, x, norm, batch_size).argmax(-1) == y).mean()) if len(y) else 0.0


class Objective(Protocol):
    """A training objective with trainable parameters of its own next to the model's (MwT's mask
    generators), for ``fit(..., objective=)``; without one, ``fit`` minimises cross-entropy.

    name: recorded in the checkpoint's identity, with its settings (a resume under other
    settings is refused). num_classes: the classes of its logits (None:
    the model's; a new head may have fewer). ``init(key, model)`` -> the extra parameters
    (a pytree of arrays). ``loss(model, extra, x, y, *, dropout_key, dropout)`` -> ``(loss,
    metrics)`` on normalised images x [B, H, W, C] and labels y [B] in training mode; metrics
    is a dict of scalars with ``"accuracy"`` (each is averaged into the epoch's history as
    ``train_<name>``). ``logits(model, extra, x)`` -> [B, K] in eval mode (validation). All
    three are traced under ``jax.jit``; the optimiser updates model and extra parameters alike.
    """

    name: str
    num_classes: int | None

    def init(self, key: jax.Array, model: SplittableModel) -> Any: ...

    def loss(self, model, extra, x, y, *, dropout_key, dropout: bool) -> tuple[jax.Array, dict]: ...

    def logits(self, model, extra, x) -> jax.Array: ...


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the best-validation model and its history; ``extra``: an
    objective's parameters of that epoch (None without an objective)."""

    model: SplittableModel
    best_val_accuracy: float
    best_epoch: int
    history: list[dict]
    train_seconds: float
    extra: Any = None


def _split_indices(ds: Dataset, cfg: TrainConfig):
    alpha, min_size = dirichlet_settings(cfg, ds.info.name)
    return split_indices(ds.y_train, cfg.seed, cfg.val_fraction, alpha, min_size, cfg.split_scheme,
                         cfg.train_images)


def validation_images(x_u8: np.ndarray, cfg: TrainConfig, epoch: int) -> np.ndarray:
    """The validation images of ``epoch``: ``x_u8`` itself, or with ``cfg.augment_val`` a flip +
    crop augmented copy (uint8, the key derived from ``cfg.seed`` and ``epoch`` only, so a
    resumed run sees the same images)."""
    if not cfg.augment_val:
        return x_u8
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), _VAL_STREAM), epoch)
    return np.asarray(_augment_u8(key, jnp.asarray(x_u8)))


_VAL_STREAM = 0x76616C  # "val": the validation augmentation's key stream
_augment_u8 = jax.jit(augment)


def fit(
    model: SplittableModel,
    ds: Dataset,
    cfg: TrainConfig = TrainConfig(),
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks=None,
    mesh=None,
    identity: dict | None = None,
    objective: Objective | None = None,
) -> FitResult:
    """Train ``model`` on ``ds`` and return the best-validation model.

    Args:
      run_dir: if given, checkpoints the training state every epoch to
        ``run_dir/train_state`` (+ ``train_state.json``).
      resume: continue from ``run_dir/train_state``: the same config, model structure and
        data (a content digest of the training images and labels) are required, and the
        caller's ``identity`` (e.g. the dataset spec) too; a difference is refused naming it.
      callbacks: ``Progress`` callbacks: stage ``"step"`` (metrics ``loss``, ``acc``) after
        each step, ``"epoch"`` (the epoch's history record) after each validation.
      mesh: data-parallel training: each batch split along the mesh's ``data`` axis
        (``mesh.make_mesh`` spec or ``Mesh``), parameters and optimiser state replicated, the
        gradient (and BatchNorm's batch statistics) reduced over all devices by the
        partitioner; None: every local device. A batch that does not divide the axis runs
        whole on every device.
      identity: what else a resume must find equal (JSON values; the pipeline's dataset spec).
      objective: train with this ``Objective`` (its own parameters initialised from a key
        derived from ``cfg.seed``, trained and checkpointed with the model's, validation through
        its ``logits``); None: cross-entropy of the model alone.

    Raises:
      TrainingDivergedError: the mean loss of an epoch is NaN or infinite (that epoch is not
        checkpointed; the previous one is intact).
      CheckpointError: a resume of another run, or a damaged checkpoint.
    """
    check_compatible(model, ds.info, objective.num_classes if objective is not None else None)
    tr_idx, va_idx = _split_indices(ds, cfg)
    steps_per_epoch = -(-len(tr_idx) // cfg.batch_size)
    tx = make_optimizer(cfg, steps_per_epoch)
    graphdef, state = _initial_state(model, cfg, tx, objective)
    best = _kept(state)
    identity = {**(identity or {}), "model": ckpt.config_json(model.config()), "dataset": ds.info.name,
                "training data digest": ckpt.fingerprint(ds.x_train, ds.y_train),
                **({"objective": objective.name} if objective is not None else {})}
    loop = ckpt.ResumableLoop(run_dir, "train_state", ckpt.config_json(cfg), identity, seconds_key="train_seconds")
    best_acc, best_epoch = -1.0, -1
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs run_dir")
        restored = loop.resume({"state": state, "best": best})
        state, best = restored["state"], restored["best"]
        best_acc, best_epoch = loop.fields["best_val_accuracy"], loop.fields["best_epoch"]
    mesh = meshlib.resolve_data(mesh)
    state = meshlib.replicate(state, mesh)
    step = _train_step(graphdef, tx, ds, cfg, mesh, objective)
    cbs = callbacks_of(callbacks)
    for epoch in range(loop.done, cfg.epochs):
        t0 = time.perf_counter()
        state, metrics = _train_epoch(step, state, tr_idx, epoch, cfg, cbs)
        train_loss, train_acc = metrics.pop("loss"), metrics.pop("accuracy")
        _check_finite(train_loss, epoch, run_dir)
        cur = nnx.merge(graphdef, state["params"], state["stats"])
        x_val, y_val = validation_images(ds.x_train[va_idx], cfg, epoch), ds.y_train[va_idx]
        val_acc = (accuracy(cur, x_val, y_val, ds.info, cfg.eval_batch_size) if objective is None else
                   objective_accuracy(objective, cur, state["extra"], x_val, y_val, ds.info, cfg.eval_batch_size))
        loop.seconds += time.perf_counter() - t0
        if val_acc >= best_acc or cfg.keep == "last":
            best_acc, best_epoch = val_acc, epoch
            best = _kept(state)
        rec = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
               **{f"train_{k}": v for k, v in metrics.items()}, "val_accuracy": val_acc, "seconds": loop.seconds}
        loop.record(rec, {"state": state, "best": best}, epoch=epoch, best_val_accuracy=best_acc,
                    best_epoch=best_epoch)
        notify(cbs, Progress("epoch", epoch, cfg.epochs, metrics=rec))
        if cfg.patience > 0 and epoch - best_epoch >= cfg.patience:
            break
    final = nnx.merge(graphdef, best["params"], best["stats"])
    return FitResult(final, best_acc, best_epoch, loop.history, loop.seconds, best.get("extra"))


def _check_finite(train_loss: float, epoch: int, run_dir) -> None:
    if not np.isfinite(train_loss):
        raise TrainingDivergedError(
            f"the training loss became {train_loss} in epoch {epoch} (learning rate too large, or non-finite "
            f"inputs); nothing of this epoch was kept" + (f", the last good checkpoint in {run_dir} is intact"
                                                          if run_dir is not None and epoch > 0 else ""))


_OBJECTIVE_STREAM = 0x6F626A  # "obj": the key stream of an objective's initial parameters


def _initial_state(model, cfg: TrainConfig, tx, objective):
    """(graphdef, state): the model's parameters and BN statistics, the shuffling key, an
    objective's parameters (from a key derived from ``cfg.seed``) and the optimiser state."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {"params": params, "stats": stats, "key": jax.random.key(cfg.seed)}
    if objective is not None:
        state["extra"] = objective.init(jax.random.fold_in(jax.random.key(cfg.seed), _OBJECTIVE_STREAM), model)
    state["opt"] = tx.init(_trainable(state))
    return graphdef, state


def _trainable(state: dict):
    """What the optimiser updates: the model's parameters, and an objective's if there is one."""
    return (state["params"], state["extra"]) if "extra" in state else state["params"]


def _kept(state: dict) -> dict:
    """What a kept (best / last) epoch records: parameters, BN statistics, an objective's parameters."""
    return {k: state[k] for k in ("params", "stats", "extra") if k in state}


@functools.partial(jax.jit, static_argnums=0)
def _objective_logits(objective, model, extra, x_u8, mean, std):
    return objective.logits(model, extra, normalize(x_u8, mean, std))


def objective_accuracy(objective: Objective, model: SplittableModel, extra, x: np.ndarray, y: np.ndarray, norm,
                       batch_size: int = 512) -> float:
    """``accuracy`` of ``model`` run as ``objective.logits`` with the objective's parameters ``extra``."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if not len(y):
        return 0.0
    mean, std = (jnp.asarray(v) for v in Normalization.of(norm))
    logits = map_batches(lambda xb: _objective_logits(objective, model, extra, jnp.asarray(xb), mean, std), [x],
                         batch_size, pad=False)
    return float((np.asarray(logits).argmax(-1) == y).mean())


def _train_step(graphdef, tx, ds: Dataset, cfg: TrainConfig, mesh, objective: Objective | None = None):
    """The jitted ``step(state, idx) -> (state, loss, metrics)`` of one batch of training
    indices: augmentation (``cfg.augment``, default on for RGB), normalisation, the loss
    (cross-entropy, or ``objective.loss``), the optimiser over the model's (and the objective's)
    parameters; a batch that divides the mesh's ``data`` axis is split over it."""
    mean, std = jnp.asarray(ds.info.mean), jnp.asarray(ds.info.std)
    x_all, y_all = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    do_augment = cfg.augment if cfg.augment is not None else ds.info.channels == 3
    n_data = meshlib.axis_size(mesh, "data")

    @jax.jit
    def step_on(state, idx, x_all, y_all):  # the data are arguments, not constants baked into the executable
        key, k_aug, k_drop = jax.random.split(state["key"], 3)
        x = x_all[idx]
        if mesh is not None and idx.shape[0] % n_data == 0:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec("data")))
        if do_augment:
            x = augment(k_aug, x)
        x = normalize(x, mean, std)
        y = y_all[idx]

        def loss_fn(trainable):
            p, extra = trainable if objective is not None else (trainable, None)
            # fresh Variable objects in this trace so BN may update its running stats
            m = nnx.merge(graphdef, p, jax.tree.map(jnp.asarray, state["stats"]))
            if objective is not None:
                loss, metrics = objective.loss(m, extra, x, y, dropout_key=k_drop, dropout=cfg.dropout)
            else:
                logits = m(x, train=True, dropout_key=k_drop, dropout=cfg.dropout)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                metrics = {"accuracy": (logits.argmax(-1) == y).mean()}
            return loss, (nnx.state(m, nnx.BatchStat), metrics)

        trainable = _trainable(state)
        (loss, (stats, metrics)), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        upd, opt = tx.update(g, state["opt"], trainable)
        new = optax.apply_updates(trainable, upd)
        out = {"stats": stats, "opt": opt, "key": key}
        if objective is not None:
            out["params"], out["extra"] = new
        else:
            out["params"] = new
        return out, loss, metrics

    return lambda state, idx: step_on(state, idx, x_all, y_all)


def _train_epoch(step, state, tr_idx, epoch: int, cfg: TrainConfig, cbs):
    """One epoch of ``step`` over shuffled batches of ``tr_idx``: (state, mean loss, mean
    accuracy); callbacks get a ``Progress("step", ...)`` per batch."""
    key, k_epoch = jax.random.split(state["key"])
    state = {**state, "key": key}
    steps_per_epoch = -(-len(tr_idx) // cfg.batch_size)
    seen = []
    for s, bidx in enumerate(batches(len(tr_idx), cfg.batch_size, key=k_epoch)):
        state, loss, metrics = step(state, jnp.asarray(tr_idx[bidx]))
        if cbs:
            notify(cbs, Progress("step", epoch, cfg.epochs, s, steps_per_epoch,
                                 {"loss": float(loss), "acc": float(metrics["accuracy"])}))
        seen.append({"loss": loss, **metrics})
    jax.block_until_ready(state)
    return state, {k: float(jnp.mean(jnp.stack([m[k] for m in seen]))) for k in seen[0]}


def summary(model: SplittableModel) -> dict:
    """Kernel and parameter counts of ``model``."""
    return {"num_kernels": total_kernels(model), "num_params": count_params(model)}
