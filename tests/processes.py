"""Interrupting a subprocess the hard way, for the tests that check kill -9 loses nothing."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def kill_9_when(proc: subprocess.Popen, progressed: Callable[[], bool], what: str, limit: float = 240) -> str:
    """SIGKILL ``proc`` as soon as ``progressed()`` holds (it must within ``limit`` seconds), assert
    that the kill is what ended it, and return its stderr."""
    deadline = time.monotonic() + limit
    try:
        while proc.poll() is None and not progressed():
            assert time.monotonic() < deadline, f"the {what} made no progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the run was not interrupted: rc={proc.returncode}\n{err}"
    return err
