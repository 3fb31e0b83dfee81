"""Training and evaluation of base models (reference recipe, all configurable).

SGD with momentum 0.9, coupled weight decay 1e-4 (PyTorch style), lr 0.01 scaled by 0.1 at
30% and 60% of the epochs (= epochs 60 and 120 of the reference's 200), batch 128, optional
flip + crop(32, pad 4) augmentation, BN batch statistics. After each epoch the model is
evaluated on a validation split; the best (>=, later ties win, as the reference) is kept.
``fit`` checkpoints every epoch and resumes bit-identically from the last checkpoint.

Library code reports progress only through ``cnnsplit_jax.progress`` callbacks (stage
``"step"`` and ``"epoch"``); the CLI draws the bars.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, Protocol
from pathlib import Path
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from . import checkpoint as ckpt
from . import mesh as meshlib
from .data import (Dataset, DatasetInfo, Normalization, batches, estimator_recipe, map_batches, normalize,
                   split_indices)
from .models import count_params, total_kernels
from .models.protocol import SplittableModel
from .progress import Progress, callbacks_of, notify
from .validate import at_least, finite, fraction

__all__ = [
    "TrainConfig",
    "RECIPES",
    "dirichlet_settings",
    "recipe_warnings",
    "summary",
    "make_optimizer",
    "learning_rates",
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters (defaults = the reference's ``train.py``)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.3, 0.6)  # fractions of `epochs`
    lr_gamma: float = 0.1
    augment: bool | None = None  # None: on for 3-channel data (as the reference), off for
    #                               grayscale digits/clothes, where a mirror changes the class
    val_fraction: float = 0.2
    # "seeded": a permutation seeded by `seed`; "cnnsplitter": CNNSplitter's split (seed 1009,
    # int(0.8 n)), so its search images are held out from training as in the reference
    split_scheme: Literal["seeded", "cnnsplitter"] = "seeded"
    # True: pick the best epoch on a flip + crop augmented copy of the validation split, drawn
    # afresh each epoch (seeded), as GradSplitter's base training (its validation set is a copy
    # of the augmented training set); for exact replication of its epoch choice
    augment_val: bool = False
    # the reference's non-IID estimator subsample: None: the whole training split; "auto": the
    # dataset's recipe (data.estimator_recipe: SVHN 0.5, others 1); a number: that alpha
    dirichlet_alpha: float | Literal["auto"] | None = None
    dirichlet_min_size: int | None = None  # None: the dataset's recipe (SVHN 10, others 100)
    # at most this many training images: the first of the (seeded, shuffled) training part, for
    # CPU-sized experiments; None: all of it. The validation part is unchanged
    train_images: int | None = None
    seed: int = 0
    eval_batch_size: int = 512
    dropout: bool = True  # False: the poor-fit recipe (no dropout while training)
    keep: Literal["best", "last"] = "best"  # best-validation epoch (reference), or the final one
    patience: int = 0  # > 0: stop after this many epochs without a better val accuracy
    optimizer: Literal["sgd", "adam"] = "sgd"  # SGD with momentum, or Adam (Pan & Rajan's Keras ResNets)
    nesterov: bool = False  # Nesterov momentum (SGD only; MwT's recipe)
    # "step": lr x lr_gamma at each of lr_milestones; "cosine": PyTorch's CosineAnnealingLR
    # stepped once per epoch over `epochs` (lr_e = lr (1 + cos(pi e / epochs)) / 2; MwT's recipe)
    lr_schedule: Literal["step", "cosine"] = "step"
    cosine_period: float = 1.0  # the cosine's T_max in multiples of `epochs` (MwT's module fine-tuning: 2)

    def __post_init__(self):
        at_least("epochs", self.epochs, 1)
        at_least("batch_size", self.batch_size, 1)
        at_least("eval_batch_size", self.eval_batch_size, 1)
        at_least("patience", self.patience, 0)
        if self.train_images is not None:
            at_least("train_images", self.train_images, 1)
        if self.dirichlet_min_size is not None:
            at_least("dirichlet_min_size", self.dirichlet_min_size, 1)
        at_least("seed", self.seed, 0)
        finite("lr", self.lr, lo=0.0, strict=True)
        finite("momentum", self.momentum, lo=0.0, hi=1.0)
        finite("weight_decay", self.weight_decay, lo=0.0)
        finite("lr_gamma", self.lr_gamma, lo=0.0, strict=True)
        if self.dirichlet_alpha != "auto":
            finite("dirichlet_alpha", self.dirichlet_alpha, lo=0.0, strict=True, optional=True)
        fraction("val_fraction", self.val_fraction)
        finite("cosine_period", self.cosine_period, lo=0.0, strict=True)
        for f in self.lr_milestones:
            finite("every lr milestone (a fraction of the epochs)", f, lo=0.0, hi=1.0)
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if self.split_scheme not in ("seeded", "cnnsplitter"):
            raise ValueError(f"split_scheme must be 'seeded' or 'cnnsplitter', got {self.split_scheme!r}")
        if self.split_scheme == "cnnsplitter" and self.dirichlet_alpha is not None:
            raise ValueError("split_scheme 'cnnsplitter' trains on the whole training set: no dirichlet_alpha")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr_schedule not in ("step", "cosine"):
            raise ValueError(f"lr_schedule must be 'step' or 'cosine', got {self.lr_schedule!r}")
        if self.nesterov and self.optimizer != "sgd":
            raise ValueError("nesterov applies to optimizer 'sgd' only")
        if self.lr_schedule == "cosine" and self.lr_milestones:
            raise ValueError("lr_schedule 'cosine' has no milestones: give lr_milestones=() (--lr-milestones "
                             "with no value)")


#: CNNSplitter's patching recipes (spec cnnsplitter.md 1c.3), as TrainConfig overrides.
RECIPES: dict[str, dict] = {
    "reference": {},
    # weak models: 100 epochs of SGD 0.01 / momentum 0.9 / wd 1e-4, batch 128, no lr steps
    "weak": {"epochs": 100, "lr_milestones": ()},
    # poor fit: plain SGD (no momentum, no wd), no augmentation, no dropout, 200 epochs; the
    # final (over-fitted) epoch is kept; an under-fitted model is the same with fewer epochs
    "poor-fit": {"epochs": 200, "momentum": 0.0, "weight_decay": 0.0, "lr_milestones": (),
                 "augment": False, "dropout": False, "keep": "last"},
    # Pan & Rajan's ResNets (Keras resnet_v1 example, no BN): Adam 1e-3, L2 1e-4, lr x0.1 at
    # 40% / 60% / 80% of the epochs (SGD 0.01-0.1 leaves BN-free ResNets at chance here)
    "resnet": {"optimizer": "adam", "lr": 1e-3, "lr_milestones": (0.4, 0.6, 0.8)},
    # a short run that trains a narrow model on a small dataset in about a minute (the demo's:
    # digits to ~0.99 in 12 epochs, where the reference schedule reaches 0.63 in 10)
    "quick": {"epochs": 12, "batch_size": 64, "lr": 0.05, "lr_milestones": (0.75,)},
    # MwT's modular training (spec mwt.md): SGD Nesterov 0.9, lr 0.05 for the model and the
    # mask generators, no weight decay, cosine annealing over 200 epochs, batch 128; the
    # reference saves the final epoch
    "mwt": {"epochs": 200, "lr": 0.05, "nesterov": True, "weight_decay": 0.0, "lr_milestones": (),
            "lr_schedule": "cosine", "keep": "last"},
    # the same schedule over 12 epochs, best validation epoch kept: a CPU-sized run on small data
    "mwt-quick": {"epochs": 12, "lr": 0.05, "nesterov": True, "weight_decay": 0.0, "lr_milestones": (),
                  "lr_schedule": "cosine"},
}


def recipe_warnings(cfg: TrainConfig, recipe: str) -> list[str]:
    """Why a run with ``cfg`` is far too short for its schedule (empty when it is not)."""
    if recipe == "mwt" and cfg.epochs < 60:
        return [f"{cfg.epochs} epochs of MwT's reference schedule (cosine annealing made for 200 epochs, the final "
                "epoch kept) is far too short; for short runs use the 'mwt-quick' recipe (best validation epoch)"]
    if recipe == "reference" and cfg.epochs < 60:
        return [f"{cfg.epochs} epochs of the reference schedule (lr {cfg.lr:g}, x{cfg.lr_gamma:g} at "
                f"{', '.join(f'{f:.0%}' for f in cfg.lr_milestones)} of the epochs) is far too short: it is "
                "made for ~200 epochs; for short runs use the 'quick' recipe"]
    return []


def learning_rates(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate at each optimiser step: step decay at ``lr_milestones``, or PyTorch's
    ``CosineAnnealingLR(T_max=epochs * cosine_period)`` stepped once per epoch (constant within
    an epoch)."""
    if cfg.lr_schedule == "cosine":
        def cosine(step):
            epoch = jnp.floor_divide(step, steps_per_epoch)
            return cfg.lr * (1.0 + jnp.cos(jnp.pi * epoch / (cfg.epochs * cfg.cosine_period))) / 2.0
        return cosine
    boundaries = {
        int(round(f * cfg.epochs)) * steps_per_epoch: cfg.lr_gamma for f in cfg.lr_milestones
    }
    return optax.piecewise_constant_schedule(cfg.lr, boundaries)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD + momentum (Nesterov with ``cfg.nesterov``, PyTorch's form) or Adam, with coupled L2
    (grad + wd * param, as torch.optim.SGD / Keras L2 regularisers) and ``lr_schedule``."""
    schedule = learning_rates(cfg, steps_per_epoch)
    if cfg.optimizer not in ("sgd", "adam"):
        raise ValueError(f"TrainConfig.optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
    opt = (optax.adam(schedule) if cfg.optimizer == "adam" else
           optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)


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

    name: recorded in the checkpoint's identity. num_classes: the classes of its logits (None:
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


def dirichlet_settings(cfg: TrainConfig, dataset: str) -> tuple[float | None, int]:
    """(alpha, min_size) of the Dirichlet subsample a run on ``dataset`` draws: the config's
    values, ``"auto"`` / None filled in from ``data.estimator_recipe(dataset)``; alpha None: no
    subsample (the whole training split)."""
    recipe = estimator_recipe(dataset)
    alpha = recipe.alpha if cfg.dirichlet_alpha == "auto" else cfg.dirichlet_alpha
    return alpha, recipe.min_size if cfg.dirichlet_min_size is None else cfg.dirichlet_min_size


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
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = {"params": params, "stats": stats, "key": jax.random.key(cfg.seed)}
    if objective is not None:
        state["extra"] = objective.init(jax.random.fold_in(jax.random.key(cfg.seed), _OBJECTIVE_STREAM), model)
    state["opt"] = tx.init(_trainable(state))
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
        if not np.isfinite(train_loss):
            raise TrainingDivergedError(
                f"the training loss became {train_loss} in epoch {epoch} (learning rate too large, or non-finite "
                f"inputs); nothing of this epoch was kept" + (f", the last good checkpoint in {run_dir} is intact"
                                                              if run_dir is not None and epoch > 0 else ""))
        cur = nnx.merge(graphdef, state["params"], state["stats"])
        x_val, y_val = validation_images(ds.x_train[va_idx], cfg, epoch), ds.y_train[va_idx]
        if objective is None:
            val_acc = accuracy(cur, x_val, y_val, ds.info, cfg.eval_batch_size)
        else:
            val_acc = objective_accuracy(objective, cur, state["extra"], x_val, y_val, ds.info, cfg.eval_batch_size)
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


_OBJECTIVE_STREAM = 0x6F626A  # "obj": the key stream of an objective's initial parameters


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
