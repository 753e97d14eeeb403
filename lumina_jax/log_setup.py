"""Console logging for the command-line entry points.

``logging.basicConfig`` is a no-op once any root handler exists, and importing grain/orbax installs
one (a bare ``StreamHandler`` at WARNING), which hid every INFO line of ``train`` and ``preprocess``
("resuming from ...", "stage 2/3 ...", "done at step ..."). :func:`setup` replaces such a bare
handler with ours, leaves other handlers (pytest's capture, a notebook's) alone, and writes to the
``sys.stderr`` of the moment, so it can be called again (tests call the CLIs in-process).
"""

from __future__ import annotations

import logging
import sys

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """A ``StreamHandler`` on whatever ``sys.stderr`` is when a record is written."""

    def __init__(self, fmt: str):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(fmt))

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # set by StreamHandler.__init__; the property always wins
        pass


def setup(level: int = logging.INFO, fmt: str = DEFAULT_FORMAT, quiet: tuple[str, ...] = ("absl", "orbax", "jax._src")) -> None:
    """Root logger at ``level`` with one console handler in ``fmt``; the ``quiet`` loggers at WARNING."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__):  # a library's basicConfig
            root.removeHandler(h)
        elif isinstance(h, _StderrHandler):
            root.removeHandler(h)
    root.addHandler(_StderrHandler(fmt))
    root.setLevel(level)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
