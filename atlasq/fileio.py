"""Writing files so that a reader, or a run that resumes after a crash, never sees half of one."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["replaced"]


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its name + ``.tmp``, so leftovers are easy to spot);
    when the block ends without error, the temporary file replaces ``path`` in one rename.
    Writers that choose a format by the file name need it stated (PIL's ``format=``) or a file
    object (``np.save`` would append ``.npy``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block failed
