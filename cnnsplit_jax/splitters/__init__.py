"""The three decomposition methods, one API (``base``): ``split(key, model, data, cfg, *,
ckpt_dir=None, resume=False, callbacks=None) -> SplitResult``.

* ``gradsplitter``: kernel masks learned by gradient descent (Qi et al., TOSEM 2023);
* ``cnnsplitter``: kernel masks searched by a genetic algorithm (Qi et al., ASE 2022);
* ``concern``: decomposition by concern identification (Pan & Rajan, ICSE 2022; ResNets).

``METHODS`` maps the CLI's method names to (module, config class, the model ``mask_kind`` it
applies to).
"""

from . import cnnsplitter, concern, gradsplitter
from .base import SearchDivergedError, SplitData, SplitResult
from .cnnsplitter import CNNSplitterConfig
from .concern import ConcernConfig
from .gradsplitter import GradSplitterConfig

__all__ = ["METHODS", "CNNSplitterConfig", "ConcernConfig", "GradSplitterConfig", "SearchDivergedError",
           "SplitData", "SplitResult", "cnnsplitter", "concern", "gradsplitter"]

#: method name -> (splitter module with ``split``, its config class, the ``mask_kind`` of models it splits)
METHODS = {
    "grad": (gradsplitter, GradSplitterConfig, "kernel"),
    "ga": (cnnsplitter, CNNSplitterConfig, "kernel"),
    "concern": (concern, ConcernConfig, "node"),
}
