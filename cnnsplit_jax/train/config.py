"""Training configuration: ``TrainConfig``, the named recipes, and the optimiser and learning-rate
schedule a config makes (SGD with momentum, optionally Nesterov, or Adam; coupled L2; step
decay or cosine annealing)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import optax

from ..data import estimator_recipe
from ..validate import at_least, finite, fraction

__all__ = ["TrainConfig", "RECIPES", "recipe_warnings", "learning_rates", "make_optimizer", "dirichlet_settings"]


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


#: the recipes made for ~200 epochs, and the short recipe to use instead
LONG_RECIPES = {"reference": "quick", "mwt": "mwt-quick"}


def recipe_warnings(cfg: TrainConfig, recipe: str) -> list[str]:
    """Why a run with ``cfg`` is far too short for its schedule (empty when it is not)."""
    short = LONG_RECIPES.get(recipe)
    if short is None or cfg.epochs >= 60:
        return []
    schedule = ("cosine annealing, the final epoch kept" if cfg.lr_schedule == "cosine" else
                f"lr {cfg.lr:g}, x{cfg.lr_gamma:g} at {', '.join(f'{f:.0%}' for f in cfg.lr_milestones)} of the epochs")
    return [f"{cfg.epochs} epochs of the {recipe!r} schedule ({schedule}) is far too short: it is made for ~200 "
            f"epochs; for short runs use the {short!r} recipe"]


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


def dirichlet_settings(cfg: TrainConfig, dataset: str) -> tuple[float | None, int]:
    """(alpha, min_size) of the Dirichlet subsample a run on ``dataset`` draws: the config's
    values, ``"auto"`` / None filled in from ``data.estimator_recipe(dataset)``; alpha None: no
    subsample (the whole training split)."""
    recipe = estimator_recipe(dataset)
    alpha = recipe.alpha if cfg.dirichlet_alpha == "auto" else cfg.dirichlet_alpha
    return alpha, recipe.min_size if cfg.dirichlet_min_size is None else cfg.dirichlet_min_size
