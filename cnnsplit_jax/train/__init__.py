"""Training and evaluation of base models (reference recipe, all configurable).

SGD with momentum 0.9, coupled weight decay 1e-4 (PyTorch style), lr 0.01 scaled by 0.1 at
30% and 60% of the epochs (= epochs 60 and 120 of the reference's 200), batch 128, optional
augmentation, best validation epoch (``config``: ``TrainConfig``, ``RECIPES``, the optimiser;
``loop``: ``fit``, ``predict``, ``accuracy``, ``Objective``).
"""

from .config import RECIPES, TrainConfig, dirichlet_settings, learning_rates, make_optimizer, recipe_warnings
from .loop import (FitResult, Objective, TrainingDivergedError, accuracy, augment, check_compatible, fit,
                   objective_accuracy, predict, summary, validation_images)

__all__ = ["TrainConfig", "RECIPES", "dirichlet_settings", "recipe_warnings", "summary", "make_optimizer",
           "learning_rates", "Objective", "augment", "validation_images", "check_compatible", "predict", "accuracy",
           "objective_accuracy", "fit", "FitResult", "TrainingDivergedError"]
