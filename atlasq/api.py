"""The library's front door: what the CLI and the app call, returning plain dicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DamagedError, IncompatibleError, InvalidOptionError
from .images import FileEntry, path_key
from .search import check_k, resolve_query, search
from .store import IndexStore, index_folder

__all__ = ["open_index", "index_info", "search_index", "run_demo", "embed_image", "inspect_image"]


def load_model(*args, **kwargs):
    """:func:`atlasq.model.load_model`, imported on first use: ``info`` and searches by an indexed
    image never load torch, so they start at once. (A module attribute, so tests can replace it.)"""
    from .model import load_model as load
    return load(*args, **kwargs)


def open_index(name: str, home: Path | None = None) -> IndexStore:
    """Open index ``name`` read-only."""
    return IndexStore(index_folder(name, home), read_only=True)


def check_shards(store: IndexStore) -> None:
    """:class:`DamagedError` listing the damaged shards, which ``atlasq index`` repairs."""
    problems = store.verify_shards()
    if problems:
        listed = "; ".join(f"shard {shard}: {why}" for shard, why in list(problems.items())[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DamagedError(f"index {store.folder.name!r} is damaged ({listed}{more}); run `atlasq index "
                           f"{store.meta().get('root') or 'DIR'} --name {store.folder.name}` to repair it")


def model_for_index(meta: dict, device: str | None = None):
    """Load the network an index was built with (same model and weights), checking that they
    still are the same weights (a weights file can change after the index was built)."""
    weights = meta.get("weights")
    if weights and weights.startswith("file:"):
        raise IncompatibleError(f"this index was built with a local weights file ({weights[5:]}); "
                                f"embed the query with the same file via the Python API")
    model = load_model(meta["model"], weights, device=device, seed=meta.get("seed", 0))
    if meta.get("weights_sha256") and model.weights_sha256 != meta["weights_sha256"]:
        raise IncompatibleError(f"the weights {weights or 'default'} are not those this index was built with "
                                f"(sha256 {model.weights_sha256[:12]}… ≠ {meta['weights_sha256'][:12]}…)")
    return model


def embed_image(path: Path, model, precision: str = "fp32") -> np.ndarray:
    """Pooled vector of one image file (raises ``ValueError`` if it cannot be read)."""
    from .embed import EmbedConfig, decode_file, embed_batch

    path = Path(path)
    decoded = decode_file(path.parent, FileEntry(path_key(path.name), 0, 0.0), model)
    if decoded.error:
        raise InvalidOptionError(f"cannot read {path}: {decoded.error}")
    config = EmbedConfig(layers=(model.network.pooled_layer,), samples_per_image=1, precision=precision)
    return embed_batch(model, decoded.tensor[None], [path.name], config).pooled[0]


def search_index(name: str, query: str, *, k: int = 10, mode: str = "auto", home: Path | None = None) -> dict:
    """Nearest images of ``query`` (an id, an indexed path, or an image file) in index ``name``."""
    k = check_k(k)
    with open_index(name, home) as store:
        check_shards(store)
        image_id, file = resolve_query(store, query)
        if image_id is not None:
            _, vectors = store.pooled([image_id])
            vector = vectors[0]
        else:
            vector = embed_image(file, model_for_index(store.meta()))
        hits, kind = search(store, vector, k, mode=mode, exclude=image_id)
        categories = store.meta().get("categories") or []
    label = lambda c: categories[c] if c < len(categories) else str(c)
    return {
        "query": query, "query_id": image_id, "search": kind, "k": k,
        "hits": [{"id": h.id, "path": h.path, "score": round(h.score, 6),
                  "top_class": label(h.top5_class[0]) if h.top5_class else None} for h in hits],
    }


def index_info(name: str, home: Path | None = None) -> dict:
    """Counts, settings and errors of index ``name`` (:class:`DamagedError` when shards are damaged)."""
    with open_index(name, home) as store:
        meta = store.meta()
        check_shards(store)
        return {
            "name": name, "folder": str(store.folder), "root": meta.get("root"),
            "images": store.count("images"), "samples": store.count("samples"),
            "errors": store.count("errors"), "error_list": [list(e) for e in store.errors()],
            "model": meta.get("model"), "weights": meta.get("weights"),
            "weights_sha256": meta.get("weights_sha256"), "random_weights": meta.get("random_weights"),
            "layers": meta.get("layers"), "layer_dims": meta.get("layer_dims"),
            "samples_per_image": meta.get("samples_per_image"),
            "attributions": meta.get("attributions"), "relaxed_maxpool": meta.get("relaxed_maxpool"),
            "seed": meta.get("seed"), "atlasq_version": meta.get("atlasq_version"),
            "faiss_current": store.faiss_is_current("exact"),
        }


# The demo atlas: the article's layer for ImageNet InceptionV1; mixed5a for the demo network, whose
# single-position attributions carry the class only after its last max-pool (see README).
DEMO_ATLAS = {"inceptionv1": dict(layer="mixed4c", grids=(10, 20)),
              "demo": dict(layer="mixed5a", grids=(10, 20))}


def run_demo(home: Path | None = None, name: str = "sample", progress: bool = True, say=None) -> dict:
    """Index ``sample_data/``, build its atlas and place the sample on it (so the app shows its
    counts at once): ImageNet InceptionV1 when its weights load, else the demo network. What a
    finished run built is reused. ``say(text)`` hears what happens as it happens, first which
    network is used and why."""
    from .atlas import AtlasOptions, atlas_summary, build_atlas
    from .atlasdir import AtlasFolder
    from .demo_model import sample_data_dir
    from .histogram import histogram_with_picture
    from .indexer import IndexOptions, build_index
    from .model import WeightsUnavailableError, _imagenet_cache_path

    say = say or (lambda text: None)
    cached = _imagenet_cache_path()
    was_cached = cached.is_file()
    if was_cached:
        say(f"using InceptionV1 with ImageNet weights (found in torch's cache: {cached})")
    else:  # said before the download is tried, which can take a while offline
        say(f"InceptionV1's ImageNet weights are not in torch's cache ({cached}): trying to download them; "
            f"without them the demo uses the small demo network trained on sample_data/ instead")
    try:
        load_model("inceptionv1", "imagenet")
        model, used = "inceptionv1", "inceptionv1 (ImageNet weights)"
        why = "ImageNet weights were found in torch's cache or downloaded"
        name_used = f"{name}-imagenet"
        if not was_cached:
            say("downloaded them: using InceptionV1 with ImageNet weights")
    except WeightsUnavailableError as exc:
        model, used = "demo", "demo (small network trained on sample_data/)"
        reason = str(exc).splitlines()[0]
        why = f"ImageNet weights unavailable: {reason}"
        name_used = name
        say(f"using the small demo network instead of InceptionV1, because {reason}")
    atlas_options = AtlasOptions(**DEMO_ATLAS[model])
    options = IndexOptions(model=model, attributions=True, layers=(atlas_options.layer,))
    root = sample_data_dir()
    say(f"indexing {root.name}/ as index {name_used!r}")
    summary = build_index(root, name_used, home=home, options=options, progress=progress)
    say(f"{summary.total_images:,} images indexed ({summary.indexed:,} this run), {summary.total_errors:,} errors")
    first = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".webp"))[0]
    example = search_index(name_used, first.relative_to(root).as_posix(), k=5, home=home)
    if AtlasFolder.named(name_used, home).is_complete():
        atlas = {**atlas_summary(name_used, home), "reused": True}
        say(f"atlas {name_used!r} is already built; reusing it")
    else:
        say(f"building atlas {name_used!r} at layer {atlas_options.layer} "
            f"(grids {', '.join(f'{g}×{g}' for g in atlas_options.grids)}, icons {atlas_options.steps} steps)")
        atlas = {**build_atlas(name_used, name_used, home=home, options=atlas_options, progress=progress).to_dict(),
                 "reused": False}
    placed = histogram_with_picture(name_used, name_used, home=home, progress=progress)
    say(f"placed the sample on its atlas: {placed.totals.activations:,} activations, "
        f"{placed.totals.off_atlas_share:.1%} off-atlas; heat map {placed.picture}")
    histogram = {"atlas": placed.atlas, "index": placed.index, "level": placed.level,
                 "activations": placed.totals.activations, "images": placed.totals.images,
                 "off_atlas_share": placed.totals.off_atlas_share, "picture": placed.picture}
    return {"model_used": used, "why": why, "index": summary.as_dict(), "example_search": example, "atlas": atlas,
            "histogram": histogram, "app_command": _app_command(home, name_used)}


def _app_command(home: Path | None, name: str) -> str:
    """The exact ``atlasq app`` command that opens what the demo built."""
    import shlex

    from .home import default_home

    given = f" --home {shlex.quote(str(home))}" if home is not None and Path(home) != default_home() else ""
    return f"atlasq app{given} --index {shlex.quote(name)} --atlas {shlex.quote(name)}"


def inspect_image(image: str, index: str, *, out: Path | None = None, home: Path | None = None,
                  atlas: str | None = None, layer: str | None = None, classes=None, groups: int = 6,
                  seed: int = 0, from_layer: str | None = None, position: tuple[int, int] | None = None,
                  level: int | None = None, icon_steps: int | None = None, render: bool = True) -> dict:
    """The Building Blocks interface for ``image`` (an indexed id or path, or any image file) with
    index ``index``'s network (see :mod:`atlasq.blocks`): activation grid (on ``atlas`` when given),
    spatial and channel attribution to the top or given ``classes``, ``groups`` NMF neuron groups,
    and, with ``from_layer``, layer-to-layer attribution to ``position``. With ``out``, writes
    ``interface.png``, ``inspect.json`` and ``inspect.npz`` there. Returns the JSON's values."""
    from .blocks import ICON_STEPS, inspect_indexed

    result = inspect_indexed(image, index, home=home, atlas=atlas, layer=layer, classes=classes, groups=groups,
                             seed=seed, from_layer=from_layer, position=position, level=level,
                             icon_steps=icon_steps or ICON_STEPS, render=render)
    summary = result.to_dict()
    if out is not None:
        summary["files"] = result.save(Path(out))
    return summary
