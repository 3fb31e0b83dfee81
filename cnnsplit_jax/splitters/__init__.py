"""The three decomposition methods, one API (``base``): ``split(key, model, data, cfg, *,
ckpt_dir=None, resume=False, callbacks=None) -> SplitResult``.

* ``gradsplitter``: kernel masks learned by gradient descent (Qi et al., TOSEM 2023);
* ``cnnsplitter``: kernel masks searched by a genetic algorithm (Qi et al., ASE 2022);
* ``concern``: decomposition by concern identification (Pan & Rajan, ICSE 2022; ResNets).

``registry``: one ``Method`` record per method (``METHODS``, ``method(name)``), the only
place that knows a method by its name.
"""

from . import cnnsplitter, concern, gradsplitter
from .base import SearchDivergedError, SplitData, SplitResult
from .cnnsplitter import CNNSplitterConfig
from .concern import ConcernConfig
from .gradsplitter import GradSplitterConfig
from .registry import METHODS, Method, method, methods_for

__all__ = ["METHODS", "Method", "method", "methods_for", "CNNSplitterConfig", "ConcernConfig", "GradSplitterConfig", "SearchDivergedError",
           "SplitData", "SplitResult", "cnnsplitter", "concern", "gradsplitter"]
