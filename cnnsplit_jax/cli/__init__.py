"""The ``cnnsplit`` command: ``train | adapt | info | split | evaluate | compose | patch | replace | subtask | demo``.

Argument parsing (``parser``), printing, progress bars (``report``) and plots (``plots``)
only: every command calls one ``cnnsplit_jax.pipeline`` function. Errors print one or two
lines (``--verbose``: the full cause); ``RunWarning``s print as ``warning: ...`` lines.
In a run of several processes (``--coordinator``/``--num-processes``/``--process-id``, or
``--distributed``) every process runs the command; only process 0 prints and writes.
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback
import warnings

__all__ = ["main"]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from .. import distributed as dist
    from ..pipeline import RunWarning

    if not dist.is_primary():  # every process runs the command: process 0 speaks for them
        return
    if issubclass(category, RunWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    """Run ``cnnsplit`` with ``argv``; returns the exit status (2 on a user error)."""
    from .. import distributed as dist
    from ..checkpoint import CheckpointError
    from ..data import DatasetError
    from ..pipeline import RunBusyError, RunWarning
    from .commands import COMMANDS
    from .parser import build_parser

    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    with warnings.catch_warnings():
        warnings.simplefilter("always", RunWarning)
        warnings.showwarning = _show_warning
        try:
            dist.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
            quiet = contextlib.nullcontext() if dist.is_primary() else contextlib.redirect_stdout(io.StringIO())
            with quiet:
                return COMMANDS[args.command](args)
        except (DatasetError, CheckpointError, ValueError, FloatingPointError, RunBusyError, OSError) as e:
            # a user's error, a damaged file, a diverged loss, a busy or unwritable directory: one line
            print(f"error: {e}", file=sys.stderr)
            detail = getattr(e, "detail", None)
            if verbose:
                if detail:
                    print(detail, file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
            elif detail:
                print("(run with --verbose for the full cause)", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
