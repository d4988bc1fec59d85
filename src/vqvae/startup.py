"""The ``vqvae`` command's first seconds: Ctrl-C or SIGTERM while it imports torch ends it with
one line and exit 130 / 143, not a 30-frame KeyboardInterrupt traceback.

Imported first by the package's ``__init__`` (stdlib only); ``python -m vqvae`` shows argv[0]
``-m`` while it imports the package, the console script is named ``vqvae``. A library import of
vqvae is left alone. Once the imports are done (:func:`imported`) the handlers are restored and
:func:`vqvae.cli.main` handles a signal itself.
"""

import os
import signal
import sys
from pathlib import Path
from typing import Any


def _interrupted_while_starting(signum: int, frame: Any) -> None:
    # Nothing is written yet, so exiting at once is safe; raising into a half-imported C
    # extension instead turns a clean stop into an ImportError traceback.
    sys.stderr.write("vqvae: interrupted while starting\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _is_command() -> bool:
    return sys.argv[:1] == ["-m"] or bool(sys.argv) and Path(sys.argv[0]).stem == "vqvae"


_previous: dict[int, Any] = {}
if _is_command():
    try:
        for _sig in (signal.SIGINT, signal.SIGTERM):
            _previous[_sig] = signal.signal(_sig, _interrupted_while_starting)
    except ValueError:  # not the main thread: no signal handling
        pass


def imported() -> None:
    """The package is imported: put the signal handlers back."""
    while _previous:
        signal.signal(*_previous.popitem())
