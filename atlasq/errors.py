"""The one family of errors a user can act on.

Everything atlasq raises because of what it was given (a missing index, a bad option, a locked or
damaged file, weights that cannot be loaded) derives from :class:`AtlasqError`. The command line
prints exactly these as one line (``{"error": ...}`` with ``--json``) and exits non-zero; any other
exception is a bug and keeps its traceback. Library callers catch :class:`AtlasqError` the same way.

The subclasses also derive from the built-in exception a Python caller would expect
(``ValueError`` for bad values, ``FileNotFoundError`` for something missing), so ``except
ValueError`` around a library call keeps working.
"""

from __future__ import annotations

__all__ = ["AtlasqError", "InvalidOptionError", "NotFoundError", "BusyError", "DamagedError",
           "IncompatibleError"]


class AtlasqError(Exception):
    """A problem with the input or the files on disk, explained by its message; not a bug."""

    exit_code = 1


class InvalidOptionError(AtlasqError, ValueError):
    """An option or argument has a value that cannot work (the message names the option)."""

    exit_code = 2


class NotFoundError(AtlasqError, FileNotFoundError):
    """An index, atlas, image or file that was asked for does not exist."""


class BusyError(AtlasqError, RuntimeError):
    """Another process holds a file (an index being written) for longer than we wait."""


class DamagedError(AtlasqError, RuntimeError):
    """A file atlasq wrote is damaged or unreadable (the message says which and what to do)."""


class IncompatibleError(AtlasqError, ValueError):
    """Two things cannot be used together: an index and an atlas of other weights or layers, an
    index and options that contradict how it was built."""
