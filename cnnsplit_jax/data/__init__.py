"""Data: named datasets as uint8 NumPy arrays plus metadata (``sources``), splits and tasks
(``splits``), normalisation and batching (``batching``)."""

from .batching import Normalization, batches, check_images, fit_images, check_labels, map_batches, normalize, sum_batches, to_uint8
from .sources import (DATASETS, Dataset, DatasetError, DatasetInfo, DatasetOrderWarning, image_stats, load_dataset,
                      read_idx)
from .splits import (CNNSPLITTER_SEED, ESTIMATOR_RECIPES, SPLIT_SCHEMES, EstimatorRecipe, Task, class_holdout,
                     holdout_split, dirichlet_subsample, estimator_recipe, is_task_spec, load_task, make_task, parse_classes,
                     parse_task, select_classes, split_indices, test_splits, train_val_split)

__all__ = [
    "DATASETS", "Dataset", "DatasetError", "DatasetInfo", "DatasetOrderWarning", "Normalization", "fit_images", "Task", "batches", "check_images", "check_labels",
    "dirichlet_subsample", "to_uint8", "ESTIMATOR_RECIPES", "EstimatorRecipe", "estimator_recipe",
    "SPLIT_SCHEMES", "CNNSPLITTER_SEED", "holdout_split", "class_holdout",
    "image_stats", "is_task_spec", "load_dataset", "load_task", "make_task", "map_batches",
    "normalize", "parse_classes", "split_indices", "parse_task", "read_idx", "select_classes", "sum_batches",
    "test_splits", "train_val_split",
]
