"""Progress of long loops (training, searches): one event type, one callback signature.

Library code never prints: training and every splitter call ``callbacks`` with ``Progress``
events, and the CLI turns them into progress bars and log lines::

    def show(p: Progress):
        if p.stage == "epoch":
            print(p.index, p.metrics["val_accuracy"])

    split(key, model, data, cfg, callbacks=show)        # a callable or a sequence of them
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, Union

__all__ = ["Progress", "Callback", "RunWarning", "callbacks_of", "notify"]


class RunWarning(UserWarning):
    """A run will not do what it is run for (too short a schedule, a rounded setting, an
    initial population at chance, ...). The CLI prints these as ``warning: ...`` lines."""


class Progress(NamedTuple):
    """One event of a long loop.

    stage: ``"step"`` (an optimisation step inside an epoch), ``"epoch"``, ``"generation"``
      (CNNSplitter) or ``"batch"`` (a forward batch of a one-pass method);
    index: the epoch / generation / batch (0-based); total: how many there are in all;
    step, steps: the step inside the epoch and the steps of the epoch (stage ``"step"``);
    metrics: floats (a step's loss and accuracy; an epoch's or generation's history record).
    """

    stage: str
    index: int
    total: int
    step: int = 0
    steps: int = 0
    metrics: dict = {}


Callback = Callable[[Progress], None]


def callbacks_of(callbacks: Union[Callback, Sequence[Callback], None]) -> tuple[Callback, ...]:
    """``None`` -> (), one callable -> (it,), a sequence -> tuple."""
    if callbacks is None:
        return ()
    if callable(callbacks):
        return (callbacks,)
    return tuple(callbacks)


def notify(callbacks: Sequence[Callback], event: Progress) -> None:
    """Call every callback with ``event``."""
    for cb in callbacks:
        cb(event)
