"""The Ray Data engine of ``atlasq index --engine ray``: decoding and embedding across a cluster.

The driver (the ``atlasq index`` process) plans the run as usual and keeps the single writer:
DuckDB rows, shard arrays and FAISS are written only by it, chunk by chunk, exactly as the local
engine writes them (see :mod:`atlasq.indexer`). What it hands to Ray is the pure per-batch step
(:func:`atlasq.embed.decode_file` then :func:`atlasq.embed.embed_decoded`): a Ray Data dataset
of the files to do, one row per file, goes through ``map_batches`` over an actor pool. Each actor
(:class:`EmbedActor`) loads the network once, then turns batches of file paths into per-file
records (an error reason, or the pooled vector, top-5 and sampled activations/attributions).
Records stream back to the driver in file order and are committed as they arrive, so an
interrupted run (Ctrl-C, ``kill -9`` of the driver) resumes from the last commit as the local
engine does. An actor that dies is restarted by Ray and its batch is retried; since the driver
writes a batch only once it has come back whole, nothing is written twice.

Files are read by the workers, so every worker must see the image folder (and a ``--weights``
file) at the same path as the driver: a shared filesystem.

Ray is optional (``pip install 'atlasq[ray]'``) and imported only here, only for this engine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AtlasqError, InvalidOptionError

__all__ = ["RayEngine", "require_ray", "DIE_ONCE_ENV"]

#: Test hook: when set (in the driver's environment) to a file path, the first actor that creates
#: that file exits abruptly in the middle of a batch, as a crashed worker would, so tests can check
#: that Ray retries the batch and that nothing is lost or written twice.
DIE_ONCE_ENV = "ATLASQ_RAY_DIE_ONCE"


def require_ray():
    """The ``ray`` module, or an :class:`AtlasqError` that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library is an extra of ray itself)
    except ImportError as exc:
        raise AtlasqError(f"--engine ray needs Ray Data, which is not installed ({exc}); install it with "
                          f"`pip install 'atlasq[ray]'`") from exc
    return ray


@dataclass(frozen=True)
class RayEngine:
    """How to run the per-batch step on Ray.

    address : ``None`` starts a local Ray for the run (and stops it after); ``"auto"`` joins the
        cluster this machine is part of; else a cluster address (``ray://host:10001``, ``host:6379``).
    num_workers : actors in the pool (``None``: one per CPU of the cluster, or per ``gpus_per_worker``
        GPUs when workers use GPUs).
    gpus_per_worker : GPUs each actor reserves (fractions share a card); 0 runs the network on CPUs.
    cpus_per_worker : CPUs each actor reserves, and torch threads it runs with.
    """

    address: str | None = None
    num_workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1

    def __post_init__(self):
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                             or self.num_workers < 1):
            raise InvalidOptionError(f"--num-workers must be a whole number of at least 1, not {self.num_workers!r}")
        if not isinstance(self.gpus_per_worker, (int, float)) or self.gpus_per_worker < 0:
            raise InvalidOptionError(f"--gpus-per-worker must be a number >= 0, not {self.gpus_per_worker!r}")
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, int) or self.cpus_per_worker < 1:
            raise InvalidOptionError(f"cpus_per_worker must be a whole number of at least 1, not {self.cpus_per_worker!r}")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise InvalidOptionError(f"--ray-address must be auto or a cluster address, not {self.address!r}")

    def describe(self) -> dict:
        return {"engine": "ray", "address": self.address or "local", "num_workers": self.num_workers,
                "gpus_per_worker": self.gpus_per_worker}

    # ------------------------------------------------------------------ the driver's side
    def embedded_batches(self, root: Path, entries: list, *, model_spec: dict, config, shapes: dict,
                         batch_size: int, precision: str):
        """``(decoded, embedded)`` per batch of ``entries``, in order, as the local engine yields them
        (``decoded`` without tensors: only what the writer stores). ``model_spec``: the keyword
        arguments of :func:`atlasq.model.load_model` plus the ``weights_sha256`` every actor must
        find; ``shapes``: layer → channels and ``"pooled"``/``"classes"`` widths, so a batch of
        unreadable files still has columns of the right shape."""
        if not entries:
            return
        ray = require_ray()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray"
                raise AtlasqError(f"cannot start or join {where}: {str(exc).splitlines()[0]}") from exc
        try:
            yield from self._stream(ray, root, entries, model_spec, config, shapes, batch_size, precision)
        finally:
            if started_here:
                ray.shutdown()

    def _pool_size(self, ray) -> int:
        if self.num_workers is not None:
            return self.num_workers
        resources = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))

    def _stream(self, ray, root, entries, model_spec, config, shapes, batch_size, precision):
        from ray.data import DataContext

        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # ids in file order, as the local engine gives them
        context.enable_progress_bars = False              # the driver shows its own
        context.print_on_execution_start = False
        items = [{"path": e.path.encode("utf-8", "surrogateescape"), "size": e.size, "mtime": e.mtime}
                 for e in entries]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
        # Ray Data makes pool actors restartable and retries their tasks by default: a worker that
        # dies (killed, out of memory) is replaced and its batch runs again on a live one.
        records = dataset.map_batches(
            EmbedActor, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self._pool_size(ray)),
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None,
            fn_constructor_kwargs=dict(root=str(root), model_spec=model_spec, config=config, shapes=shapes,
                                       precision=precision, threads=self.cpus_per_worker,
                                       use_gpu=bool(self.gpus_per_worker),
                                       die_once=os.environ.get(DIE_ONCE_ENV)))
        try:
            for batch in records.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                yield from _split_records(batch, config)
        except Exception as exc:
            cause = _user_error(exc)
            if cause is not None:
                raise cause from exc
            raise


def _user_error(exc: BaseException) -> AtlasqError | None:
    """The :class:`AtlasqError` a worker raised (Ray wraps it), if that is what ``exc`` carries."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, AtlasqError):
            return exc
        cause = getattr(exc, "cause", None)
        if isinstance(cause, AtlasqError):
            return cause
        exc = exc.__cause__ or exc.__context__
    return None


def _split_records(batch: dict, config):
    """One block of records back into ``(decoded, embedded)`` batches for the writer."""
    from .embed import Decoded, Embedded
    from .images import FileEntry

    n = len(batch["path"])
    if not n:
        return
    errors = [str(e) for e in batch["error"]]
    decoded = [Decoded(FileEntry(bytes(p).decode("utf-8", "surrogateescape"), int(s), float(m)),
                       width=int(w), height=int(h), hash=str(hs), error=e or None)
               for p, s, m, w, h, hs, e in zip(batch["path"], batch["size"], batch["mtime"], batch["width"],
                                               batch["height"], batch["hash"], errors)]
    ok = np.array([not e for e in errors], bool)
    embedded = None
    if ok.any():
        embedded = Embedded(pooled=np.asarray(batch["pooled"][ok], np.float32),
                            top5_class=np.asarray(batch["top5_class"][ok]),
                            top5_prob=np.asarray(batch["top5_prob"][ok], np.float32))
        for layer in config.layers:
            embedded.positions[layer] = np.asarray(batch[f"pos.{layer}"][ok])
            embedded.activations[layer] = np.asarray(batch[f"act.{layer}"][ok], np.float32)
            if config.attributions:
                embedded.attributions[layer] = np.asarray(batch[f"attr.{layer}"][ok], np.float32)
    yield decoded, embedded


# ---------------------------------------------------------------------- the workers' side

class EmbedActor:
    """One worker of the pool: the network, loaded once, and the pure per-batch step."""

    def __init__(self, *, root: str, model_spec: dict, config, shapes: dict, precision: str, threads: int,
                 use_gpu: bool, die_once: str | None = None):
        import torch

        from .model import load_model, relax_maxpool

        torch.set_num_threads(threads)
        spec = dict(model_spec)
        expected = spec.pop("weights_sha256")
        self.model = load_model(**spec, device="cuda" if use_gpu else "cpu")
        if self.model.weights_sha256 != expected:
            raise AtlasqError(f"a Ray worker loaded other weights than the driver ({spec.get('weights')!r}: sha256 "
                              f"{self.model.weights_sha256[:12]}… ≠ {expected[:12]}…); every worker must read "
                              f"the same weights file")
        if precision == "bf16" and not use_gpu:
            self.model.network.to(memory_format=torch.channels_last)
        self.root, self.config, self.shapes = Path(root), config, shapes
        self.relaxed = relax_maxpool(self.model.network) if config.attributions and config.relaxed_maxpool else None
        self.die_once = die_once

    def _maybe_die(self) -> None:
        """The test hook of :data:`DIE_ONCE_ENV`: the first actor to claim the marker file exits."""
        if not self.die_once:
            return
        try:
            os.close(os.open(self.die_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)

    def __call__(self, batch: dict) -> dict:
        from .embed import decode_file, embed_decoded
        from .images import FileEntry

        paths = [bytes(p).decode("utf-8", "surrogateescape") for p in batch["path"]]
        entries = [FileEntry(p, int(s), float(m)) for p, s, m in zip(paths, batch["size"], batch["mtime"])]
        decoded = [decode_file(self.root, entry, self.model) for entry in entries]
        self._maybe_die()
        embedded = embed_decoded(self.model, decoded, self.config, self.relaxed)
        return _records(batch["path"], decoded, embedded, self.config, self.shapes)


def _records(raw_paths, decoded: list, embedded, config, shapes: dict) -> dict:
    """Columns of one row per file: what the writer needs, zeros in the vector columns of errors."""
    n, k = len(decoded), config.samples_per_image
    ok = np.array([d.error is None for d in decoded], bool)
    out = {
        "path": np.asarray(raw_paths, dtype=object),
        "size": np.array([d.entry.size for d in decoded], np.int64),
        "mtime": np.array([d.entry.mtime for d in decoded], np.float64),
        "width": np.array([d.width for d in decoded], np.int64),
        "height": np.array([d.height for d in decoded], np.int64),
        "hash": np.array([d.hash for d in decoded], dtype=object),
        "error": np.array([d.error or "" for d in decoded], dtype=object),
    }

    def column(name, width, values, dtype, inner=()):
        full = np.zeros((n, *inner, width), dtype)
        if values is not None:
            full[ok] = values
        out[name] = full

    # Each column in the narrowest type that holds what the writer stores: the shards keep
    # activations and attributions as float16, so casting here instead of in the driver gives the
    # same values and halves what crosses the object store (and the network, on a cluster).
    column("pooled", shapes["pooled"], embedded and embedded.pooled, np.float32)
    top = min(5, shapes["classes"])
    column("top5_class", top, embedded and embedded.top5_class, np.int32)
    column("top5_prob", top, embedded and embedded.top5_prob, np.float32)
    for layer in config.layers:
        pick = lambda table: table[layer] if embedded is not None else None
        column(f"pos.{layer}", 2, pick(embedded.positions) if embedded else None, np.int32, (k,))
        column(f"act.{layer}", shapes[layer], pick(embedded.activations) if embedded else None, np.float16, (k,))
        if config.attributions:
            column(f"attr.{layer}", shapes["classes"], pick(embedded.attributions) if embedded else None,
                   np.float16, (k,))
    return out
