"""The four decomposition methods, one API (``base``): ``split(key, model, data, cfg, *,
ckpt_dir=None, resume=False, callbacks=None) -> SplitResult``.

* ``gradsplitter``: kernel masks learned by gradient descent (Qi et al., TOSEM 2023);
* ``cnnsplitter``: kernel masks searched by a genetic algorithm (Qi et al., ASE 2022);
* ``concern``: decomposition by concern identification (Pan & Rajan, ICSE 2022; ResNets);
* ``mwt``: modularizing while training (Qi et al., ICSE 2024): a model trained with mask
  generators (``MwTObjective`` for ``train.fit``), modularized by its kernels' per-class
  activity.

``registry``: one ``Method`` record per method (``METHODS``, ``method(name)``), the only
place that knows a method by its name.
"""

from . import cnnsplitter, concern, gradsplitter, mwt
from .base import SearchDivergedError, SplitData, SplitResult
from .cnnsplitter import CNNSplitterConfig
from .concern import ConcernConfig
from .gradsplitter import GradSplitterConfig
from .mwt import MwTConfig, MwTObjective, MwTSplitConfig
from .registry import METHODS, Method, method, methods_for

__all__ = ["METHODS", "Method", "method", "methods_for", "CNNSplitterConfig", "ConcernConfig", "GradSplitterConfig", "SearchDivergedError",
           "SplitData", "SplitResult", "cnnsplitter", "concern", "gradsplitter", "mwt", "MwTConfig", "MwTObjective",
           "MwTSplitConfig"]
