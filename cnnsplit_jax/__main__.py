"""``python -m cnnsplit_jax``: the ``cnnsplit`` command.

Python puts the current directory first on the import path of ``python -m``; it is dropped
here, before any dependency or definition is imported, so that a ``.py`` file lying in the
directory the command runs from is never imported in place of a real module (the ``cnnsplit``
script never had it on its path). A directory the user puts on ``PYTHONPATH`` stays.
"""

import os
import sys

if not sys.flags.safe_path and sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
    del sys.path[0]

from cnnsplit_jax.cli import main  # noqa: E402

sys.exit(main())
