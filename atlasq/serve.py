"""How ``atlasq app`` starts Streamlit on the page script :mod:`atlasq.webapp`.

The app can write (its "Place it now" button places a dataset on an atlas) and reads any image
of an index, so it listens on this machine only (127.0.0.1) unless asked for another address.
Streamlit's usage statistics and its developer toolbar (the Deploy button) are turned off: the
app is a local tool, not a deployed site.

Everything a user can get wrong here (a home that does not exist, a port that is taken, an
address that is not this machine's) is found before Streamlit starts and raised as an
:class:`~atlasq.errors.AtlasqError`, so the command prints one line instead of Streamlit's
traceback.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from .errors import BusyError, InvalidOptionError, NotFoundError
from .home import check_name, default_home

__all__ = ["APP_THREADS", "DEFAULT_HOST", "DEFAULT_PORT", "PAGE", "app_environment", "streamlit_command"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
PAGE = Path(__file__).resolve().parent / "webapp.py"


#: Numeric libraries' thread pools in the app's process: one thread each. The app's numeric work
#: is small (one image through the network, a query, a search), and with a pool of two the idle
#: workers of torch's, FAISS's and BLAS's OpenMP spin between those small calls and take the cores
#: from the server and the browser (measured with bench/app.py; README).
APP_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def app_environment(base: dict | None = None) -> dict:
    """The environment to serve the app in: ``base`` (default: this process's) with
    :data:`APP_THREADS` where it does not set them itself."""
    env = dict(os.environ if base is None else base)
    for name, value in APP_THREADS.items():
        env.setdefault(name, value)
    return env


def streamlit_command(home: Path | None = None, *, index: str | None = None, atlas: str | None = None,
                      host: str | None = None, port: int | None = None) -> list[str]:
    """The command line that serves the app on ``host:port`` for ``home``, after checking that it
    can start: ``home`` is a folder, ``host`` is an address of this machine and ``port`` is free
    on it."""
    home = Path(home or default_home())
    host = DEFAULT_HOST if host is None else host
    port = DEFAULT_PORT if port is None else port
    if not 1 <= port <= 65535:
        raise InvalidOptionError(f"--port must be between 1 and 65535, not {port}")
    if not host.strip():
        raise InvalidOptionError("--host must not be empty (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    for name, what in ((index, "index"), (atlas, "atlas")):
        if name is not None:
            check_name(name, what)
    if not home.is_dir():
        raise NotFoundError(f"home folder {home} does not exist: build an index there first "
                            f"(`atlasq index DIR --name NAME --home {home}`) or pass the right --home")
    _check_free(host, port)
    command = [sys.executable, "-m", "streamlit", "run", str(PAGE),
               "--server.address", host, "--server.port", str(port),
               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
               # Streamlit's full garbage collection after every run walked the loaded network's
               # objects (0.2-0.3 s a run, delaying the next); Python's own collector still runs
               "--runner.postScriptGC", "false",
               # after any run that imported a module, Streamlit's source watcher looked up the file
               # of every loaded module (thousands, with torch) to watch them for edits: about a
               # second in which the server sent nothing; the installed page is not edited
               "--server.fileWatcherType", "none",
               "--", "--home", str(home)]
    command += ["--index", index] if index else []
    command += ["--atlas", atlas] if atlas else []
    return command


def _check_free(host: str, port: int) -> None:
    """Bind ``host:port`` the way Streamlit's server will (address reuse on), and let go."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InvalidOptionError(f"--host {host!r} is not an address this machine knows: {exc.strerror}") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BusyError(f"port {port} on {host} is already in use (another atlasq app?); "
                                f"stop that one or choose another --port") from exc
            raise InvalidOptionError(f"cannot listen on {host}:{port}: {exc.strerror}; "
                                     f"check --host and --port") from exc
