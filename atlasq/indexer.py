"""``atlasq index``: bring an index up to date with a folder of images.

Only new or changed files (by size and modification time) are processed, and every file that
failed before is tried again; files that have disappeared are dropped (but not those under a
folder that cannot be listed now, which is reported instead). atlasq homes and index folders
under the root are never indexed (see :func:`atlasq.images.scan_folder`). Work is committed in
chunks (see :mod:`atlasq.store`), so an interrupted run, whether by Ctrl-C or ``kill -9``,
resumes where the last chunk ended.
Decoding runs in a thread pool a few batches ahead of the network (Pillow and the
preprocessing release the GIL), so the network is not left waiting for images.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .devices import gpu_decoding
from .embed import Decoded, EmbedConfig, decode_file, decode_on_gpu, embed_decoded, read_for_gpu
from .errors import IncompatibleError, InvalidOptionError, NotFoundError
from .home import default_home, mark_home
from .images import Scan, scan_folder
from .index_options import FIXED, INDEX_DEFAULTS, RUN_DEFAULTS, IndexOptions, RunSettings
from .model import LoadedModel, layer_shapes, load_model, relax_maxpool, resolve_device, resolve_precision
from .progress import progress_bar
from .search import sync_faiss
from .store import DB_FILE, Chunk, IndexStore, index_folder

__all__ = ["IndexOptions", "RunSettings", "INDEX_DEFAULTS", "RUN_DEFAULTS", "IndexSummary", "build_index"]


@dataclass
class IndexSummary:
    """What a run did. ``new_errors``: files that failed for the first time; ``retried_errors``:
    files that had failed before and were tried again (``fixed_errors`` of them are indexed now);
    ``scan_errors``: folders and symlinks that could not be read (also in the errors table);
    ``skipped_homes``: atlasq homes and index folders under the root, left out."""

    name: str
    folder: str
    root: str
    found: int = 0
    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    changed: int = 0
    new_errors: int = 0
    retried_errors: int = 0
    fixed_errors: int = 0
    scan_errors: int = 0
    total_images: int = 0
    total_errors: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    interrupted: bool = False
    model: dict = field(default_factory=dict)
    faiss: dict = field(default_factory=dict)
    error_examples: list = field(default_factory=list)
    skipped_homes: list = field(default_factory=list)
    repaired: dict = field(default_factory=dict)  # damaged shards forgotten and re-embedded, FAISS files rebuilt
    engine: dict = field(default_factory=lambda: {"engine": "local"})  # where decoding and embedding ran

    def as_dict(self) -> dict:
        return asdict(self)


def _settle_options(stored: dict, given: IndexOptions, root: Path, name: str) -> IndexOptions:
    """Merge the options given now with those the index was built with (its ``stored`` meta);
    refuse contradictions, and another folder under the same name."""
    if stored.get("root") and stored["root"] != str(root):
        raise IncompatibleError(f"index {name!r} was built from {stored['root']}, not {root}; "
                                f"use another --name for another folder")
    settled = {}
    for key in FIXED:
        now, before = getattr(given, key), stored.get(key)
        if key == "weights" and now is not None and Path(now).is_file():
            now = str(Path(now).resolve())  # a weights file is recorded by its absolute path
        if isinstance(before, list):
            before = tuple(before)
        if now is not None and before is not None and now != before:
            raise IncompatibleError(
                f"this index was built with {key}={before!r}; it cannot be extended with {key}={now!r}. "
                f"Use another --name for a different setting.")
        value = now if now is not None else before
        settled[key] = value if value is not None else getattr(INDEX_DEFAULTS, key)
    return IndexOptions(**settled)


@dataclass
class _Plan:
    todo: list = field(default_factory=list)        # entries to decode and embed
    forget: list = field(default_factory=list)      # stored paths whose rows go before processing
    removed: int = 0
    unchanged: int = 0
    changed: int = 0
    retried: set = field(default_factory=set)       # stored paths that had failed before


def _plan(store: IndexStore, scan: Scan) -> _Plan:
    """What this run must do.

    A file that failed before is tried again whatever its size and time say: what made it fail
    (a permission, a copy still being written) can go away without the file changing. Rows of
    files under a folder that cannot be listed now are kept: the folder is reported instead.
    """
    indexed, failed = store.file_states(), store.error_states()
    current = {e.path: e for e in scan.entries}
    problems = {p.path for p in scan.problems}
    hidden = tuple(p.path + "/" for p in scan.problems if p.folder)
    plan = _Plan()
    gone = [path for path in indexed if path not in current and not path.startswith(hidden)]
    gone += [path for path in failed if path not in current and path not in problems and path not in indexed
             and not path.startswith(hidden)]
    changed = []
    for entry in scan.entries:
        before = indexed.get(entry.path)
        if before is None:
            plan.todo.append(entry)
            if entry.path in failed:
                plan.retried.add(entry.path)
        elif (before[1], before[2]) != (entry.size, entry.mtime):
            plan.todo.append(entry)
            changed.append(entry.path)
        else:
            plan.unchanged += 1
    plan.forget = gone + changed + sorted(plan.retried)
    plan.removed, plan.changed = len(gone), len(changed)
    return plan


def _decoded_batches(root: Path, entries: list, model: LoadedModel, batch_size: int, workers: int,
                     gpu: bool = False):
    """Batches of :class:`Decoded`, in order, decoded by a thread pool kept two batches ahead.

    ``gpu``: the threads only read files (and decode on the CPU those the GPU does not take), and
    each batch's JPEGs are decoded together on the GPU (see :func:`atlasq.embed.decode_on_gpu`).
    """
    read = read_for_gpu if gpu else decode_file
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="atlasq-decode")
    pending: deque = deque()
    source = iter(entries)
    try:
        for entry in islice(source, 3 * batch_size):
            pending.append(pool.submit(read, root, entry, model))
        while pending:
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            for entry in islice(source, len(batch)):
                pending.append(pool.submit(read, root, entry, model))
            yield decode_on_gpu(root, batch, model) if gpu else batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ChunkBuilder:
    """Accumulates embedded batches into one :class:`Chunk`."""

    def __init__(self, layers: tuple[str, ...], next_id: int):
        self.layers, self.next_id = layers, next_id
        self.reset()

    def reset(self) -> None:
        self.images = {k: [] for k in ("id", "path", "bytes", "mtime", "width", "height", "hash",
                                       "top5_class", "top5_prob")}
        self.samples = {k: [] for k in ("image_id", "layer", "k", "y", "x")}
        self.pooled, self.acts, self.attrs, self.errors = [], {}, {}, []

    def __len__(self) -> int:
        return len(self.images["id"]) + len(self.errors)

    def add(self, decoded: list[Decoded], embedded) -> None:
        ok = [d for d in decoded if d.error is None]
        self.errors += [(d.entry.path, d.entry.size, d.entry.mtime, d.error) for d in decoded if d.error]
        if not ok:
            return
        ids = list(range(self.next_id, self.next_id + len(ok)))
        self.next_id += len(ok)
        for i, (image_id, d) in enumerate(zip(ids, ok)):
            for key, value in (("id", image_id), ("path", d.entry.path), ("bytes", d.entry.size),
                               ("mtime", d.entry.mtime), ("width", d.width), ("height", d.height),
                               ("hash", d.hash), ("top5_class", embedded.top5_class[i].tolist()),
                               ("top5_prob", embedded.top5_prob[i].tolist())):
                self.images[key].append(value)
        self.pooled.append(embedded.pooled)
        for layer in self.layers:
            pos = embedded.positions[layer]
            k = pos.shape[1]
            self.samples["image_id"] += np.repeat(ids, k).tolist()
            self.samples["layer"] += [layer] * (len(ids) * k)
            self.samples["k"] += np.tile(np.arange(k), len(ids)).tolist()
            self.samples["y"] += pos[..., 0].reshape(-1).tolist()
            self.samples["x"] += pos[..., 1].reshape(-1).tolist()
            acts = embedded.activations[layer]
            self.acts.setdefault(layer, []).append(acts.reshape(-1, acts.shape[-1]))
            if layer in embedded.attributions:
                attrs = embedded.attributions[layer]
                self.attrs.setdefault(layer, []).append(attrs.reshape(-1, attrs.shape[-1]))

    def build(self) -> Chunk:
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        return Chunk(images=self.images, pooled=cat(self.pooled), samples=self.samples,
                     activations={k: cat(v) for k, v in self.acts.items()},
                     attributions={k: cat(v) for k, v in self.attrs.items()}, errors=self.errors)


def build_index(root: Path, name: str, *, home: Path | None = None, options: IndexOptions | None = None,
                precision: str | None = None, device: str | None = None, batch_size: int | None = None,
                workers: int | None = None, streams: int | None = None, commit_every: int | None = None,
                progress: bool = True, approx_threshold: int | None = None,
                lock_wait: float | None = None, engine=None) -> IndexSummary:
    """Index (or update the index of) the images under ``root`` as index ``name``.

    ``None`` for any setting means its default (:data:`RUN_DEFAULTS`; for ``options``, what the
    index already has, else :data:`INDEX_DEFAULTS`). Everything a user can get wrong is refused
    before anything is written: the settings, the home, contradictions with the index, and the
    network and its weights, which are loaded first. Then, holding the index's writer lock, the
    index is created or opened, damaged shards are forgotten so their images are embedded again,
    new and changed files are embedded, and the FAISS files are checked and rebuilt as needed.

    ``engine``: ``None`` or ``"local"`` decodes and embeds in this process's threads; a
    :class:`atlasq.ray_engine.RayEngine` runs that step on a Ray Data actor pool, while this
    process still plans and writes everything.
    """
    started = time.perf_counter()
    run = RunSettings.given(precision=precision, device=device, batch_size=batch_size, workers=workers,
                            streams=streams, commit_every=commit_every, approx_threshold=approx_threshold,
                            lock_wait=lock_wait)
    given = options if options is not None else IndexOptions()
    if not isinstance(given, IndexOptions):
        raise InvalidOptionError(f"options must be IndexOptions, not {type(given).__name__}")
    engine = _check_engine(engine)
    root = Path(root).resolve()
    if not root.is_dir():
        raise NotFoundError(f"image folder {root} does not exist" if not root.exists()
                            else f"{root} is not a folder of images")
    folder = index_folder(name, home)
    dev = resolve_device(run.device)
    run_precision = resolve_precision(run.precision, dev)
    _check_writable(folder)
    meta = _stored_meta(folder, run.lock_wait)
    opts = _settle_options(meta, given, root, name)
    model = _load_model(opts, meta, run.device)
    scan = scan_folder(root)

    _create_folder(folder, home)
    with ExitStack() as held:
        try:
            held.enter_context(IndexStore.writer(folder, wait=run.lock_wait))
            store = held.enter_context(IndexStore.create(folder, lock_wait=run.lock_wait))
        except PermissionError as exc:
            raise InvalidOptionError(f"cannot write the index at {folder} ({exc.strerror}); choose a writable "
                                     f"--home") from exc
        summary = IndexSummary(name=name, folder=str(folder), root=str(root), found=len(scan.entries),
                               skipped_homes=scan.skipped_homes, scan_errors=len(scan.problems))
        meta = store.meta()  # again: another run may have built the index while this one waited
        settled = _settle_options(meta, given, root, name)
        if settled != opts:
            opts, model = settled, _load_model(settled, meta, run.device)
        _check_weights(model, opts, meta)
        _update(store, root, name, opts, model, scan, run, dev, run_precision, progress, summary, engine)
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.images_per_s = round(summary.indexed / summary.seconds, 2) if summary.seconds else 0.0
    return summary


def _update(store: IndexStore, root: Path, name: str, opts: IndexOptions, model: LoadedModel, scan: Scan,
            run: RunSettings, dev: torch.device, precision: str, progress: bool, summary: IndexSummary,
            engine=None) -> None:
    """The writing part of :func:`build_index`, under the writer lock."""
    meta = store.meta()
    config = EmbedConfig(layers=tuple(opts.layers), samples_per_image=opts.samples_per_image,
                         attributions=opts.attributions, relaxed_maxpool=opts.relaxed_maxpool,
                         precision=precision, seed=opts.seed)
    if config.precision == "bf16" and dev.type == "cpu":
        model.network.to(memory_format=torch.channels_last)
    streams = network_streams(dev, run.streams, attributions=config.attributions)
    relaxed = relax_maxpool(model.network) if config.attributions and config.relaxed_maxpool else None
    # The options' "weights" (what load_model needs to load them again) must win over the
    # model's description ("file:NAME"), or a later run could not reload the same file.
    store.set_meta({
        "root": str(root), "atlasq_version": __version__, **model.describe(),
        **{k: getattr(opts, k) for k in FIXED},
        "weights": meta.get("weights") or opts.weights or model.weights,
        "categories": model.categories, "pooled_layer": model.network.pooled_layer,
    })
    summary.model = model.describe()
    shapes = layer_shapes(model, [*config.layers, model.network.pooled_layer])
    store.set_meta({"layer_dims": {name: channels for name, (channels, _, _) in shapes.items()}})
    if run.approx_threshold is not None:  # remembered, so later runs and searches use it too
        store.set_meta({"approx_threshold": int(run.approx_threshold)})
    store.remove_orphans()
    damaged = store.verify_shards()
    if damaged:  # forget their rows: the plan below then embeds those images again
        summary.repaired["shards"] = {str(shard): why for shard, why in damaged.items()}
        summary.repaired["images_embedded_again"] = store.forget_shards(list(damaged))
    plan = _plan(store, scan)
    todo = plan.todo
    store.remove_paths(plan.forget)
    summary.removed, summary.unchanged, summary.changed = plan.removed, plan.unchanged, plan.changed
    summary.retried_errors = len(plan.retried)
    known = plan.retried | {p.path for p in scan.problems}  # not counted as new errors

    builder = _ChunkBuilder(config.layers, store.next_image_id())
    builder.errors += [(p.path, 0, p.mtime, p.reason) for p in scan.problems]  # recorded anew each run
    last_commit = time.perf_counter()
    workers = run.workers or max(1, (os.cpu_count() or 2) - 1)
    try:
        with progress_bar(len(todo), f"indexing {name}", enabled=progress) as bar:
            if engine is None:
                decoded_batches = _decoded_batches(root, todo, model, run.batch_size, workers, gpu_decoding(dev))
                batches = _embedded_batches(decoded_batches, model, config, relaxed, streams)
            else:
                summary.engine = engine.describe()
                batches = _engine_batches(engine, root, todo, opts, model, config, shapes, run)
            for decoded, embedded in batches:
                builder.add(decoded, embedded)
                bar.advance(len(decoded))
                if len(builder) >= run.commit_every or time.perf_counter() - last_commit > 30:
                    _commit(store, builder, summary, known)
                    last_commit = time.perf_counter()
            _commit(store, builder, summary, known)
    except KeyboardInterrupt:
        summary.interrupted = True
    summary.total_images = store.count("images")
    summary.total_errors = store.count("errors")
    summary.error_examples = [list(e) for e in store.errors()[:20]]
    if not summary.interrupted:
        summary.faiss = sync_faiss(store, approx_threshold=run.approx_threshold)
        if summary.faiss.get("damaged"):
            summary.repaired["faiss"] = summary.faiss["damaged"]


def _check_engine(engine):
    """``None`` for the local engine, else the engine object, checked (Ray importable) before
    anything is written."""
    if engine is None or engine == "local":
        return None
    from .ray_engine import RayEngine, require_ray

    if engine == "ray":
        engine = RayEngine()
    if not isinstance(engine, RayEngine):
        raise InvalidOptionError(f"--engine must be local or ray, not {engine!r}")
    require_ray()
    return engine


def _engine_batches(engine, root: Path, todo: list, opts: IndexOptions, model: LoadedModel, config: EmbedConfig,
                    shapes: dict, run: RunSettings):
    """``(decoded, embedded)`` batches from a distributed engine: each worker loads the same
    network (checked by the weights' sha256) and runs the same per-batch step."""
    model_spec = {"name": opts.model, "weights": opts.weights, "seed": opts.seed,
                  "weights_sha256": model.weights_sha256}
    widths = {"pooled": shapes[model.network.pooled_layer][0], "classes": len(model.categories),
              **{layer: shapes[layer][0] for layer in config.layers}}
    return engine.embedded_batches(root, todo, model_spec=model_spec, config=config, shapes=widths,
                                   batch_size=run.batch_size, precision=config.precision)


def _check_writable(folder: Path) -> None:
    """:class:`InvalidOptionError` when the index folder could not be created or written, found
    before the network is loaded (the creation itself is checked again, for what this misses)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    where = "the index folder" if probe == folder else "--home"
    if not probe.is_dir():
        raise InvalidOptionError(f"{where}: {probe} exists but is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidOptionError(f"{where}: {probe} is not writable; choose a writable --home")


def _create_folder(folder: Path, home: Path | None) -> None:
    """Create the home (marked as one) and the index folder, or one clear error."""
    try:
        mark_home(Path(home or default_home()))
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise InvalidOptionError(f"cannot create the index folder {folder} ({exc.strerror or exc}); "
                                 f"choose a writable --home") from exc


def _stored_meta(folder: Path, lock_wait: float) -> dict:
    """The meta of the index in ``folder`` ({} when there is none yet), read without writing."""
    if not (folder / DB_FILE).is_file():
        return {}
    with IndexStore(folder, read_only=True, lock_wait=lock_wait) as store:
        return store.meta()


def _load_model(opts: IndexOptions, meta: dict, device: str) -> LoadedModel:
    """The network of ``opts``, with its layers checked and its weights compared with the index's."""
    model = load_model(opts.model, opts.weights, device=device, seed=opts.seed)
    model.network.check_layers(opts.layers)
    _check_weights(model, opts, meta)
    return model


def _check_weights(model: LoadedModel, opts: IndexOptions, meta: dict) -> None:
    """Refuse to extend an index with weights other than its own (a changed file, a retrained network)."""
    if meta.get("weights_sha256") and model.weights_sha256 != meta["weights_sha256"]:
        raise IncompatibleError(
            f"the weights {opts.weights or model.weights} are not those this index was built with "
            f"(sha256 {model.weights_sha256[:12]}… ≠ {meta['weights_sha256'][:12]}…); "
            f"use another --name for other weights")


def network_streams(device: torch.device, streams: int | None = None, *, attributions: bool = False) -> int:
    """How many batches go through the network at once.

    On a CPU with several cores: two streams of half the threads each, because one stream's
    threads wait for each other at every operator (and stall whenever a decoding thread takes a
    core), so on 2 cores two one-thread streams run the network faster than one two-thread stream
    (the README gives the measured figure). With attributions: one stream, since forward-mode AD passes cannot
    run concurrently (see :mod:`atlasq.attribution`) and would each be left with half the threads.
    """
    if streams is not None:
        if streams < 1:
            raise InvalidOptionError(f"--streams must be at least 1, not {streams}")
        return streams
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 and not attributions else 1


@contextmanager
def _threads_per_stream(streams: int):
    """Split torch's intra-op threads (a process-wide setting) between streams, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // streams))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _embedded_batches(decoded_batches, model: LoadedModel, config: EmbedConfig, relaxed, streams: int):
    """``(decoded, embedded)`` per batch, in order, with up to ``streams`` batches in the network."""
    def embed(decoded):
        return embed_decoded(model, decoded, config, relaxed)

    if streams == 1:
        for decoded in decoded_batches:
            yield decoded, embed(decoded)
        return
    pending: deque = deque()
    with _threads_per_stream(streams):
        pool = ThreadPoolExecutor(streams, thread_name_prefix="atlasq-embed")
        try:
            for decoded in decoded_batches:
                pending.append((decoded, pool.submit(embed, decoded)))
                if len(pending) >= streams:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _commit(store: IndexStore, builder: _ChunkBuilder, summary: IndexSummary, known: set) -> None:
    """Write the builder's chunk; ``known``: paths whose errors are not new (retried, scan problems)."""
    if not len(builder):
        return
    chunk = builder.build()
    store.commit(chunk)
    store.release()  # readers (the app, `atlasq search`) can open the index until the next commit
    summary.indexed += len(chunk.images["id"])
    summary.new_errors += sum(path not in known for path, *_ in chunk.errors)
    summary.fixed_errors += sum(path in known for path in chunk.images["path"])
    builder.reset()

