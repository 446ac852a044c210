"""The ``atlasq`` command line. Each command delegates to one library function.

Every command takes ``--json`` and then prints exactly one JSON object on stdout (progress
and notes go to stderr).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from . import serve
from .errors import AtlasqError, InvalidOptionError
from .index_options import APPROX_THRESHOLD, INDEX_DEFAULTS as INDEX, RUN_DEFAULTS as RUN
from .progress import stderr

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Inspect image datasets through an activation atlas of InceptionV1.")

HomeOption = typer.Option(None, "--home", envvar="ATLASQ_HOME", show_default="./indexes",
                          help="Folder holding indexes and atlases.")
JsonOption = typer.Option(False, "--json", help="Print one machine-readable JSON summary on stdout.")


def _emit(as_json: bool, payload: dict, human) -> None:
    if as_json:
        print(json.dumps(payload, default=str))
    else:
        human(payload)


def _fail(message: str, as_json: bool, code: int = 1) -> None:
    if as_json:
        print(json.dumps({"error": message}))
    stderr.print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)  # one line, any width
    raise typer.Exit(code)


def user_errors(command):
    """Print an :class:`AtlasqError` as one line (``{"error": ...}`` with ``--json``) and exit with
    its code; Ctrl-C says how to resume. Any other exception is a bug and keeps its traceback."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        try:
            return command(*args, **kwargs)
        except AtlasqError as exc:
            _fail(str(exc), as_json, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted: run the same command again to resume", as_json, 130)
    return run


def _split_csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _print_fields(record: dict, keys: tuple[str, ...], width: int) -> None:
    """One ``key: value`` line per key, keys right-aligned to ``width``."""
    for key in keys:
        print(f"{key:>{width}}: {record.get(key)}")


@app.command()
@user_errors
def index(
    directory: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    name: str = typer.Option(..., "--name", help="Name of the index (a folder under --home)."),
    home: Optional[Path] = HomeOption,
    model: Optional[str] = typer.Option(None, help="Network: inceptionv1 or demo.", show_default=INDEX.model),
    weights: Optional[str] = typer.Option(
        None, help="imagenet (default for inceptionv1), demo, random (tests/smoke runs only), or a state-dict PATH."),
    layers: Optional[str] = typer.Option(
        None, help="Atlas layers to sample, comma-separated.", show_default=",".join(INDEX.layers)),
    samples_per_image: Optional[int] = typer.Option(
        None, "--samples-per-image", help="Sampled positions per image and layer.",
        show_default=str(INDEX.samples_per_image)),
    attributions: Optional[bool] = typer.Option(None, "--attributions/--no-attributions", help="Store each sample's attribution to every class."),
    relaxed_maxpool: Optional[bool] = typer.Option(None, "--relaxed-maxpool/--plain-maxpool", help="Attribute through max-pools with the average-pool gradient (the articles' relaxation)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampled positions (and of random weights).",
                                       show_default=str(INDEX.seed)),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 where the hardware has it), fp32 or bf16.",
                                            show_default=RUN.precision),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 …", show_default=RUN.device),
    batch_size: Optional[int] = typer.Option(None, help="Images per network batch.",
                                             show_default=str(RUN.batch_size)),
    workers: Optional[int] = typer.Option(None, help="Decoding threads.", show_default="cores - 1"),
    streams: Optional[int] = typer.Option(
        None, help="Batches in the network at once, threads split between them.",
        show_default="2 on a multi-core CPU, else 1"),
    commit_every: Optional[int] = typer.Option(
        None, "--commit-every", show_default=str(RUN.commit_every),
        help="Commit to the index after this many files (an interrupted run resumes from the last commit)."),
    approx_threshold: Optional[int] = typer.Option(
        None, help="Build an approximate (HNSW) search index above this many images.",
        show_default=str(APPROX_THRESHOLD)),
    as_json: bool = JsonOption,
):
    """Index the images under DIRECTORY (only new or changed files on later runs).

    Example: atlasq index ~/photos --name photos --attributions
    """
    from .indexer import IndexOptions, build_index

    options = IndexOptions(model=model, weights=weights, layers=_split_csv(layers),
                           samples_per_image=samples_per_image, attributions=attributions,
                           relaxed_maxpool=relaxed_maxpool, seed=seed)
    summary = build_index(directory, name, home=home, options=options, precision=precision,
                          device=device, batch_size=batch_size, workers=workers, streams=streams,
                          commit_every=commit_every,
                          progress=not as_json or sys.stderr.isatty(),
                          approx_threshold=approx_threshold)
    payload = summary.as_dict()

    def human(s):
        from rich.markup import escape

        from .images import display_path

        stderr.print(f"index [bold]{s['name']}[/bold] at {escape(display_path(s['folder']))}: "
                     f"{s['indexed']} indexed this run, {s['unchanged']} unchanged, {s['changed']} changed, {s['removed']} removed, "
                     f"{s['new_errors']} new errors, {s['retried_errors']} earlier errors retried "
                     f"({s['fixed_errors']} now indexed), {s['scan_errors']} unreadable folders or links; "
                     f"{s['total_images']} images, {s['total_errors']} errors in all; "
                     f"{s['images_per_s']} img/s", highlight=False)
        for skipped in s["skipped_homes"]:
            stderr.print(f"  skipped atlasq home or index: {display_path(skipped)}", highlight=False, markup=False)
        if s["model"].get("random_weights"):
            stderr.print("[yellow]built with RANDOM weights: for tests and smoke runs only[/yellow]")
        for path, reason in s["error_examples"][:10]:
            stderr.print(f"  error: {display_path(path)}: {display_path(reason)}", highlight=False, markup=False)
        if s["repaired"]:
            stderr.print(f"[yellow]repaired:[/yellow] {s['repaired']}", highlight=False)
        if s["interrupted"]:
            stderr.print("[yellow]interrupted: run the same command again to resume[/yellow]")

    _emit(as_json, payload, human)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.total_images == 0:
        raise typer.Exit(1)


@app.command()
@user_errors
def search(
    query: str = typer.Argument(..., help="An indexed image's id or path, or any image file."),
    index_name: str = typer.Option(..., "--index", help="Index to search."),
    k: int = typer.Option(10, "-k", help="Number of neighbours."),
    mode: str = typer.Option("auto", help="auto (exact up to the threshold, approximate above), exact or approx."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Find the images most similar to QUERY (cosine on pooled mixed5b vectors).

    Example: atlasq search 42 --index photos -k 5
    """
    from .api import search_index

    result = search_index(index_name, query, k=k, mode=mode, home=home)

    def human(r):
        from .images import display_path

        stderr.print(f"query {display_path(r['query'])} ({r['search']} search)", highlight=False, markup=False)
        for hit in r["hits"]:
            print(f"{hit['score']:.4f}  {hit['id']:>8}  {display_path(hit['path'])}")

    _emit(as_json, result, human)


@app.command()
@user_errors
def info(
    name: str = typer.Argument(..., help="Index name."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Counts, layers, model and weights, and errors of an index."""
    from .api import index_info

    result = index_info(name, home=home)

    def human(r):
        _print_fields(r, ("folder", "root", "images", "samples", "errors", "model", "weights", "random_weights",
                          "layers", "layer_dims", "samples_per_image", "attributions", "relaxed_maxpool", "seed",
                          "faiss_current"), 18)
        from .images import display_path

        for path, reason in r["error_list"][:20]:
            print(f"{'error':>18}: {display_path(path)}: {display_path(reason)}")

    _emit(as_json, result, human)


@app.command()
@user_errors
def demo(
    home: Optional[Path] = HomeOption,
    name: str = typer.Option("sample", "--name", help="Name of the demo index."),
    as_json: bool = JsonOption,
):
    """Index sample_data/ and build its atlas: ImageNet weights if they load, else the small demo network."""
    from .api import run_demo

    result = run_demo(home=home, name=name, progress=not as_json)

    def human(r):
        stderr.print(f"[bold]model used:[/bold] {r['model_used']} ({r['why']})", highlight=False)
        s = r["index"]
        stderr.print(f"indexed {s['total_images']} images into {s['folder']} ({s['total_errors']} errors)",
                     highlight=False)
        q = r["example_search"]
        stderr.print(f"nearest images to {q['query']}:", highlight=False)
        for hit in q["hits"]:
            print(f"{hit['score']:.4f}  {hit['path']}")
        a = r["atlas"]
        stderr.print(f"atlas {a['name']} ({'reused' if a['reused'] else 'built'}) at layer {a['layer']}: "
                     f"{a['folder']}", highlight=False)
        stderr.print(f"next: atlasq atlas info {a['name']}   atlasq search PATH --index {s['name']}",
                     highlight=False)

    _emit(as_json, result, human)


@app.command("demo-model")
@user_errors
def demo_model_command(
    force: bool = typer.Option(False, help="Retrain even when cached weights exist."),
    as_json: bool = JsonOption,
):
    """Train (or find cached) the small demo network on sample_data/ and report its held-out accuracy."""
    from . import demo_model

    path = demo_model.ensure_trained(force=force)
    report = demo_model.report(path)
    payload = {"weights": str(path), **{k: v for k, v in report.items() if k != "held_out"}}
    _emit(as_json, payload, lambda r: print(
        f"{r['weights']}: held-out accuracy {r['held_out_accuracy']:.3f} on {r['held_out_images']} images "
        f"(trained on {r['train_images']} in {r['seconds']} s)"))


atlas_app = typer.Typer(no_args_is_help=True, help="Build and inspect reference activation atlases.")
app.add_typer(atlas_app, name="atlas")


def _split_ints(value: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _split_csv(value) or ())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, not {value!r}")


def _atlas_default(name: str) -> str:
    """``[default]`` for a help text, read from :class:`atlasq.atlas.AtlasOptions` (the one source)."""
    from rich.markup import escape

    from .atlas import option_default

    value = option_default(name)
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return " " + escape(f"[{'none' if value is None else value}]")  # rich would take [word] for markup


@atlas_app.command("build")
@user_errors
def atlas_build(
    index_name: str = typer.Option(..., "--index", help="Index to build from (made with --attributions)."),
    name: str = typer.Option(..., "--name", help="Name of the atlas (a folder under HOME/atlases)."),
    layer: Optional[str] = typer.Option(None, help="The index's sampled layer to lay out." + _atlas_default("layer")),
    grids: Optional[str] = typer.Option(
        None, help="Grid sizes, comma-separated, all from one layout." + _atlas_default("grids")),
    min_count: Optional[int] = typer.Option(
        None, "--min-count", help="Drop cells with fewer activations." + _atlas_default("min_count")),
    max_activations: Optional[int] = typer.Option(
        None, "--max-activations",
        help="Seeded subsample of the index's activations (0: all)." + _atlas_default("max_activations")),
    n_neighbors: Optional[int] = typer.Option(
        None, "--n-neighbors", help="UMAP neighbourhood size." + _atlas_default("n_neighbors")),
    min_dist: Optional[float] = typer.Option(
        None, "--min-dist", help="UMAP minimum distance." + _atlas_default("min_dist")),
    fit_size: Optional[int] = typer.Option(
        None, "--fit-size",
        help="Activations UMAP optimises; the rest are placed by k-NN (0: all)." + _atlas_default("fit_size")),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps per icon." + _atlas_default("steps")),
    icon_size: Optional[int] = typer.Option(None, "--icon-size", help="Icon side in px [80 at 224-px input]."),
    icon_batch: Optional[int] = typer.Option(
        None, "--icon-batch", help="Cells optimised together." + _atlas_default("icon_batch")),
    settle: Optional[float] = typer.Option(
        None, help="Fraction of the steps, at the end, without random transforms." + _atlas_default("settle")),
    icons: Optional[bool] = typer.Option(
        None, "--icons/--no-icons", help="Render feature-visualization icons." + _atlas_default("icons"),
        show_default=False),
    whiten: Optional[bool] = typer.Option(
        None, "--whiten", help="Compare directions in whitened activation space.", show_default=False),
    objective: Optional[str] = typer.Option(
        None, help="cosine (plain cosine to the cell's mean), dot-cosine (dot × cosine^n, the articles' formula) "
                   "or article (Lucid's code)." + _atlas_default("objective")),
    cossim_pow: Optional[float] = typer.Option(
        None, "--cossim-pow", help="n in dot × cosine^n (dot-cosine and article)." + _atlas_default("cossim_pow")),
    lr: Optional[float] = typer.Option(None, help="Adam's learning rate for the icons." + _atlas_default("lr")),
    precision: Optional[str] = typer.Option(None, help="Icons in auto, fp32 or bf16." + _atlas_default("precision")),
    seed: Optional[int] = typer.Option(
        None, help="Seeds the subsample, the layout and the icons." + _atlas_default("seed")),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing atlas of that name."),
    device: str = typer.Option("auto", help="auto, cpu, cuda …"),
    layers: Optional[str] = typer.Option(
        None, "--layers", help="Build one atlas per layer, comma-separated, named ATLAS-LAYER (instead of --layer)."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Lay out an index's activations, grid them, label cells by attribution and render icons.

    Interrupted builds resume: run the same command again.
    Example: atlasq atlas build --index photos --name photos-4c --grids 20,40
    """
    from .atlas import AtlasOptions, build_atlas

    given = dict(layer=layer, grids=_split_ints(grids, "--grids") if grids is not None else None,
                 min_count=min_count, n_neighbors=n_neighbors, min_dist=min_dist, fit_size=fit_size, steps=steps,
                 icon_size=icon_size, icon_batch=icon_batch, settle=settle, icons=icons, whiten=whiten,
                 objective=objective, cossim_pow=cossim_pow, lr=lr, precision=precision, seed=seed)
    given = {key: value for key, value in given.items() if value is not None}  # unset: AtlasOptions' default
    if max_activations is not None:  # 0 on the command line: every activation (None in AtlasOptions)
        given["max_activations"] = max_activations or None
    options = AtlasOptions(**given)
    if layers is not None:
        from .layers import build_layer_atlases

        if layer is not None:
            raise InvalidOptionError("give --layer or --layers, not both")
        built = build_layer_atlases(index_name, name, _split_csv(layers) or (), home=home, options=options,
                                    device=device, overwrite=overwrite,
                                    progress=not as_json or sys.stderr.isatty())
        _emit(as_json, {"atlases": [s.to_dict() for s in built]}, lambda r: [
            print(f"atlas {a['name']} at layer {a['layer']}: {a['activations']:,} activations; "
                  + ", ".join(f"{g}×{g} {f['cells']} cells" for g, f in a["levels"].items())) for a in r["atlases"]])
        return
    summary = build_atlas(index_name, name, home=home, options=options, device=device,
                          overwrite=overwrite, progress=not as_json or sys.stderr.isatty())

    def human(r):
        stderr.print(f"atlas {r['name']} of index {r['index']} at {r['folder']}: {r['activations']:,} "
                     f"activations of {r['layer']}", highlight=False)
        if r["random_weights"]:
            stderr.print("[yellow]built with RANDOM weights: for tests and smoke runs only[/yellow]")
        for level, facts in r["levels"].items():
            print(f"{level:>4}×{level:<4} {facts['cells']:>6} cells kept, {facts['dropped_cells']} dropped")
        print(f"icons: {r['icons_rendered']} rendered, {r['icons_reused']} reused; seconds: {r['seconds']}")

    _emit(as_json, summary.to_dict(), human)


@atlas_app.command("info")
@user_errors
def atlas_info(
    name: str = typer.Argument(..., help="Atlas name (or folder)."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Summarise an atlas: model, layer, parameters, cells per level and their top labels."""
    from .atlas import atlas_summary

    result = atlas_summary(name, home=home)

    def human(r):
        _print_fields(r, ("folder", "index", "model", "weights", "random_weights", "layer", "activations",
                          "icon_size", "icon_precision"), 15)
        if r.get("kind"):  # a class or two-class atlas (atlasq.class_atlas)
            _print_fields(r, ("kind", "analysis"), 15)
        print(f"{'options':>15}: {r['options']}")
        for level in r["levels"]:
            labels = ", ".join(f"{label} ({n})" for label, n in level["top_labels"][:6])
            print(f"{level['size']:>4}×{level['size']:<4} {level['cells']:>6} cells; most common labels: {labels}")

    _emit(as_json, result, human)


def _analysis_options(layer, grids, min_count, steps, icon_size, icons, seed):
    """AtlasOptions from the options the class and two-class commands share with ``atlas build``
    (unset ones: the analysis's defaults, see :mod:`atlasq.class_atlas`)."""
    from .atlas import AtlasOptions

    given = dict(layer=layer, grids=_split_ints(grids, "--grids") if grids is not None else None,
                 min_count=min_count, steps=steps, icon_size=icon_size, icons=icons, seed=seed)
    return AtlasOptions(**{key: value for key, value in given.items() if value is not None})


def _print_analysis_atlas(r: dict) -> None:
    stderr.print(f"atlas {r['name']} of index {r['index']} at {r['folder']}: {r['activations']:,} "
                 f"activations of {r['layer']}", highlight=False)
    for level, facts in r["levels"].items():
        print(f"{level:>4}×{level:<4} {facts['cells']:>6} cells kept, {facts['dropped_cells']} dropped")
    print(f"icons: {r['icons_rendered']} rendered; seconds: {r['seconds']}")


_AnalysisGrids = typer.Option(None, help="Grid sizes, comma-separated [8 for a class, 10 for two classes].")
_AnalysisMinCount = typer.Option(None, "--min-count", help="Drop cells with fewer activations [5].")


@atlas_app.command("class")
@user_errors
def atlas_class(
    index_name: str = typer.Option(..., "--index", help="Index to build from (made with --attributions)."),
    label: str = typer.Option(..., "--class", help="The class (its name as the network labels it)."),
    name: str = typer.Option(..., "--name", help="Name of the atlas (a folder under HOME/atlases)."),
    filter: str = typer.Option("winning", "--filter",
                               help="winning (largest attribution is the class) or magnitude (top N by attribution)."),
    top: int = typer.Option(3000, "--top", help="N kept by --filter magnitude (positive attributions only)."),
    layout: str = typer.Option("tsne", "--layout", help="tsne (the article's choice for class atlases) or umap."),
    layer: Optional[str] = typer.Option(None, help="The index's sampled layer." + _atlas_default("layer")),
    grids: Optional[str] = _AnalysisGrids,
    min_count: Optional[int] = _AnalysisMinCount,
    steps: Optional[int] = typer.Option(None, help="Optimisation steps per icon." + _atlas_default("steps")),
    icon_size: Optional[int] = typer.Option(None, "--icon-size", help="Icon side in px [80 at 224-px input]."),
    icons: Optional[bool] = typer.Option(None, "--icons/--no-icons", help="Render feature-visualization icons.",
                                         show_default=False),
    seed: Optional[int] = typer.Option(None, help="Seeds the layout and the icons." + _atlas_default("seed")),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing atlas of that name."),
    device: str = typer.Option("auto", help="auto, cpu, cuda …"),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """A class activation atlas: only the activations that matter for one class, laid out on their own.

    Example: atlasq atlas class --index photos --class snorkel --name snorkel-5b --layer mixed5b
    """
    from .class_atlas import build_class_atlas

    options = _analysis_options(layer, grids, min_count, steps, icon_size, icons, seed)
    summary = build_class_atlas(index_name, name, label, filter=filter, top=top, layout=layout, home=home,
                                options=options, device=device, overwrite=overwrite,
                                progress=not as_json or sys.stderr.isatty())
    _emit(as_json, summary.to_dict(), _print_analysis_atlas)


@atlas_app.command("two-class")
@user_errors
def atlas_two_class(
    index_name: str = typer.Option(..., "--index", help="Index to build from (made with --attributions)."),
    classes: str = typer.Option(..., "--classes", help="A,B: A's evidence is drawn on the left, B's on the right."),
    name: str = typer.Option(..., "--name", help="Name of the atlas (a folder under HOME/atlases)."),
    top: int = typer.Option(2000, "--top", help="Activations kept per class, by attribution (positive only)."),
    layer: Optional[str] = typer.Option(None, help="The index's sampled layer." + _atlas_default("layer")),
    grids: Optional[str] = _AnalysisGrids,
    min_count: Optional[int] = _AnalysisMinCount,
    steps: Optional[int] = typer.Option(None, help="Optimisation steps per icon." + _atlas_default("steps")),
    icon_size: Optional[int] = typer.Option(None, "--icon-size", help="Icon side in px [80 at 224-px input]."),
    icons: Optional[bool] = typer.Option(None, "--icons/--no-icons", help="Render feature-visualization icons.",
                                         show_default=False),
    seed: Optional[int] = typer.Option(None, help="Seeds the layout and the icons." + _atlas_default("seed")),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing atlas of that name."),
    device: str = typer.Option("auto", help="auto, cpu, cuda …"),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """A two-class comparison atlas: x = attribution to B − attribution to A, y = a 1-D t-SNE.

    Example: atlasq atlas two-class --index photos --classes snorkel,scuba_diver --name snorkel-vs-scuba
    """
    from .class_atlas import build_two_class_atlas

    pair = _split_csv(classes) or ()
    if len(pair) != 2:
        raise InvalidOptionError(f"--classes must be two classes A,B, not {classes!r}")
    options = _analysis_options(layer, grids, min_count, steps, icon_size, icons, seed)
    summary = build_two_class_atlas(index_name, name, pair[0], pair[1], top=top, home=home, options=options,
                                    device=device, overwrite=overwrite, progress=not as_json or sys.stderr.isatty())
    _emit(as_json, summary.to_dict(), _print_analysis_atlas)


def _cell(value: str) -> tuple[int, int]:
    try:
        i, j = (int(v) for v in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"--cell must be I,J (row, column), not {value!r}")
    return i, j


@app.command("histogram")
@user_errors
def histogram_command(
    atlas: str = typer.Option(..., "--atlas", help="Reference atlas."),
    index_name: str = typer.Option(..., "--index", help="Dataset to place on it (same model, weights, layer)."),
    level: Optional[int] = typer.Option(None, "--level", help="Grid size G [the atlas's coarsest]."),
    top: int = typer.Option(15, "--top", help="Cells to list, fullest first."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Place a dataset's activations on an atlas and count them per cell (a semantic histogram).

    Only activations not placed before are placed; a heat map PNG is written under the index.
    """
    from .histogram import histogram_with_picture

    if top < 0:
        raise InvalidOptionError(f"--top must be 0 or more, not {top}")
    result = histogram_with_picture(atlas, index_name, level=level, home=home,
                                    progress=not as_json or sys.stderr.isatty())

    def human(_):
        t, placed = result.totals, result.placed
        stderr.print(f"placed {placed.placed:,} new activations ({placed.already_placed:,} already placed) "
                     f"of index {result.index} on atlas {result.atlas}", highlight=False)
        print(f"{t.activations:,} activations of {t.images:,} images at level {result.level}: "
              f"{t.off_atlas:,} off-atlas ({t.off_atlas_share:.1%}), {t.outside_kept_cells:,} outside kept cells")
        for c in sorted(result.cells, key=lambda c: -c.activations)[:top]:
            if c.activations:
                print(f"  cell {c.i:>3},{c.j:<3} {c.activations:>8,} activations {c.images:>7,} images  "
                      f"{', '.join(c.top_labels)}")
        stderr.print(f"heat map: {result.picture}", highlight=False)

    _emit(as_json, result.to_dict(), human)


@app.command("cell")
@user_errors
def cell_command(
    atlas: str = typer.Option(..., "--atlas", help="Reference atlas."),
    index_name: str = typer.Option(..., "--index", help="Dataset placed on it with `atlasq histogram`."),
    cell: str = typer.Option(..., "--cell", help="I,J: row (from the top) and column."),
    level: Optional[int] = typer.Option(None, "--level", help="Grid size G [the atlas's coarsest]."),
    k: int = typer.Option(20, "-k", help="Images to list."),
    offset: int = typer.Option(0, "--offset", help="Skip this many (paging)."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """The dataset's images in one atlas cell, most typical first, with their sampled positions."""
    from .histogram import cell_images

    i, j = _cell(cell)
    result = cell_images(atlas, index_name, i, j, level=level, k=k, offset=offset, home=home)

    def human(_):
        from .images import display_path

        stderr.print(f"cell {i},{j} of level {result.level} ({', '.join(result.top_labels[:3])}): "
                     f"{len(result.images)} of {result.total_images} images from {result.offset}", highlight=False)
        for m in result.images:
            where = " ".join(f"({p['y']},{p['x']})" for p in m.positions)
            print(f"{m.cell_distance:.4f}  {display_path(m.path)}  at {where}")

    _emit(as_json, result.to_dict(), human)


@app.command("compare")
@user_errors
def compare_command(
    atlas: str = typer.Option(..., "--atlas", help="Reference atlas."),
    indexes: list[str] = typer.Option(..., "--index", help="Give twice: --index A --index B."),
    level: Optional[int] = typer.Option(None, "--level", help="Grid size G [the atlas's coarsest]."),
    alpha: float = typer.Option(0.05, help="False discovery rate for calling a cell significant."),
    top: int = typer.Option(10, "--top", help="Over- and under-represented cells to list."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the tables and the heat map."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Compare two datasets cell by cell: shares, log ratios, FDR-controlled tests, divergence."""
    from .histogram import compare

    if len(indexes) != 2:
        raise InvalidOptionError("give exactly two indexes: --index A --index B")
    result = compare(atlas, indexes[0], indexes[1], level=level, home=home, alpha=alpha, top=top, out=out)

    def human(_):
        r = result
        print(f"{r.b} vs {r.a} on {r.atlas} level {r.level}: Jensen–Shannon divergence "
              f"{r.jensen_shannon_bits:.4f} bits; {r.significant_cells} of {r.cells} cells differ "
              f"(q < {r.alpha}); off-atlas {r.off_atlas_share['a']:.1%} vs {r.off_atlas_share['b']:.1%}")
        for title, rows in (("more in " + r.b, r.over_represented_in_b),
                            ("less in " + r.b, r.under_represented_in_b)):
            print(title + ":")
            for c in rows:
                print(f"  cell {c.i:>3},{c.j:<3} {c.share_a:.2%} -> {c.share_b:.2%} "
                      f"(log2 {c.log2_ratio:+.2f}, q {c.q:.2g})  {', '.join(c.top_labels)}")
        stderr.print(f"written: {', '.join(r.files.values())}", highlight=False)

    _emit(as_json, result.to_dict(), human)


@app.command("patch-test")
@user_errors
def patch_test_command(
    index_name: str = typer.Option(..., "--index", help="Index whose images are tried."),
    from_class: str = typer.Option(..., "--from", help="Class A: images whose top-1 is A get the patch."),
    to_class: str = typer.Option(..., "--to", help="Class B: a flip is a top-1 that becomes B."),
    patch: str = typer.Option(..., "--patch", help="ATLAS:LEVEL:I,J (a cell of an atlas) or an image file."),
    patch_kind: str = typer.Option("icon", "--patch-kind", help="For a cell: its icon or its best exemplar's crop."),
    sizes: str = typer.Option("0.2,0.3,0.4,0.5", "--sizes", help="Patch sides, fractions of the image side."),
    images: Optional[int] = typer.Option(None, "--images", help="Try at most this many images (seeded choice).",
                                         show_default="all"),
    seed: int = typer.Option(0, help="Seeds the noise patch and the choice of images."),
    out: Path = typer.Option(..., "--out", help="Folder for patch_test.json, .csv and .png."),
    device: str = typer.Option("auto", help="auto, cpu, cuda …"),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Paste a patch on images of class A at each corner and size: how often does the top-1 become B?

    A random-noise patch of the same size is the control.
    Example: atlasq patch-test --index photos --from snorkel --to scuba_diver --patch cmp:10:4,9 --out patch
    """
    from .patch_test import run_patch_test

    try:
        fractions = tuple(float(v) for v in _split_csv(sizes) or ())
    except ValueError:
        raise InvalidOptionError(f"--sizes must be comma-separated fractions, not {sizes!r}")
    report = run_patch_test(index_name, from_class, to_class, patch, out=out, sizes=fractions, images=images,
                            seed=seed, patch_kind=patch_kind, home=home, device=device)

    def human(r):
        print(f"{r['images']} images of {r['from_class']} (of {r['candidates']}); share whose top-1 becomes "
              f"{r['to_class']}:")
        print(f"{'size':>6} {'patch mean':>11} {'best corner':>12} {'noise mean':>11} {'best corner':>12}")
        rows = {(x["patch"], x["size"]): x for x in r["by_size"]}
        for size in r["sizes"]:
            p, n = rows[("patch", size)], rows[("noise", size)]
            print(f"{size:>6g} {p['mean_rate']:>11.1%} {p['best_corner_rate']:>12.1%} "
                  f"{n['mean_rate']:>11.1%} {n['best_corner_rate']:>12.1%}")
        print(f"best corner and size: patch {r['best']['patch']:.1%}, noise {r['best']['noise']:.1%}")
        stderr.print(f"written: {', '.join(r['files'].values())}", highlight=False)

    _emit(as_json, report.to_dict(), human)


@app.command("app")
@user_errors
def app_command(
    index_name: Optional[str] = typer.Option(None, "--index", help="Dataset to show first."),
    atlas: Optional[str] = typer.Option(None, "--atlas", help="Atlas to show first."),
    host: Optional[str] = typer.Option(
        None, "--host", help=f"Address to listen on (default {serve.DEFAULT_HOST}: this machine only); "
                             f"0.0.0.0 exposes the app, which can write to the home, to the network."),
    port: Optional[int] = typer.Option(None, "--port", help=f"Port to listen on (default {serve.DEFAULT_PORT})."),
    home: Optional[Path] = HomeOption,
):
    """Open the Streamlit app (the atlas, per-cell counts, the images behind any cell, search)."""
    command = serve.streamlit_command(home, index=index_name, atlas=atlas, host=host, port=port)
    address, port_text = command[command.index("--server.address") + 1], command[command.index("--server.port") + 1]
    stderr.print(f"atlasq app on http://{address}:{port_text} (Ctrl-C stops it)", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":  # Streamlit takes this process's place, so Ctrl-C and signals reach it directly
        os.execv(command[0], command)
    raise typer.Exit(subprocess.call(command))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
