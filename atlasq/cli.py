"""The ``atlasq`` command line. Each command delegates to one library function.

Every command takes ``--json`` and then prints exactly one JSON object on stdout (progress
and notes go to stderr).
"""

from __future__ import annotations

import contextlib
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


#: While a ``--json`` command runs, the stream its JSON goes to; everything else the command or a
#: library prints on stdout is sent to stderr meanwhile (see :func:`_json_only_stdout`).
_json_streams: list = []


def _emit(as_json: bool, payload: dict, human) -> None:
    if as_json:
        print(json.dumps(payload, default=str), file=_json_streams[-1] if _json_streams else sys.stdout, flush=True)
    else:
        human(payload)


def _fail(message: str, as_json: bool, code: int = 1) -> None:
    if as_json:
        print(json.dumps({"error": message}), file=_json_streams[-1] if _json_streams else sys.stdout, flush=True)
    stderr.print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)  # one line, any width
    raise typer.Exit(code)


@contextlib.contextmanager
def _json_only_stdout(as_json: bool):
    """With ``--json``, stdout holds the JSON and nothing else: whatever else is printed there
    while the command runs (torch.hub's "Downloading: …" line, a library's notes) goes to stderr,
    at the level of Python's ``sys.stdout`` and, in a real process, of file descriptor 1 too
    (native code writes there directly)."""
    if not as_json:
        yield
        return
    sys.stdout.flush()
    saved_fd, stream = None, sys.stdout
    try:
        if sys.stdout.fileno() == 1:
            saved_fd = os.dup(1)
            os.dup2(2, 1)
            stream = open(saved_fd, "w", encoding="utf-8", closefd=False)
    except (AttributeError, OSError, ValueError):  # not a file (a test runner's buffer): Python level only
        pass
    _json_streams.append(stream)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_streams.pop()
        stream.flush()
        if saved_fd is not None:
            sys.stdout.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def user_errors(command):
    """Print an :class:`AtlasqError` as one line (``{"error": ...}`` with ``--json``) and exit with
    its code; Ctrl-C says how to resume. Any other exception is a bug and keeps its traceback.
    With ``--json``, stdout holds only the JSON (:func:`_json_only_stdout`)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        with _json_only_stdout(as_json):
            try:
                return command(*args, **kwargs)
            except AtlasqError as exc:
                _fail(str(exc), as_json, exc.exit_code)
            except KeyboardInterrupt:
                _fail("interrupted: run the same command again to resume", as_json, 130)
    return run


def _split_csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _human(value) -> str:
    """A value as a person reads it: thousands separated, yes/no, lists and mappings spelled out,
    "–" for nothing (never a Python repr)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, dict):
        return "; ".join(f"{str(k).replace('_', ' ')} {_human(v)}" for k, v in value.items()) or "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(_human(v) for v in value) or "–"
    return str(value)


def _print_pairs(pairs: list[tuple[str, object]]) -> None:
    """One ``label: value`` line per pair, labels right-aligned, values as :func:`_human` writes them."""
    width = max((len(label) for label, _ in pairs), default=0)
    for label, value in pairs:
        print(f"{label:>{width}}: {value if isinstance(value, str) else _human(value)}")


def _print_fields(record: dict, keys: tuple[str, ...], width: int = 0) -> None:
    """One ``key: value`` line per key of ``record`` (underscores read as spaces)."""
    _print_pairs([(key.replace("_", " "), record.get(key)) for key in keys])


def _print_table(headers: list[str], rows: list[list], right: tuple[int, ...] = ()) -> None:
    """Rows under a header line, in aligned columns (those in ``right`` right-aligned); values as
    :func:`_human` writes them. Written by hand rather than with rich's tables: those fit the
    terminal's width and fold or cut long paths, while every row here stays one whole line that
    grep, cut and a spreadsheet can take."""
    cells = [[value if isinstance(value, str) else _human(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[n]) for row in cells]) for n, h in enumerate(headers)]
    last = len(headers) - 1

    def line(values):
        return "  ".join((v.rjust(w) if n in right else v if n == last else v.ljust(w))
                         for n, (v, w) in enumerate(zip(values, widths))).rstrip()
    print(line(headers))
    for row in cells:
        print(line(row))


def _hint(text: str) -> None:
    """A note for the reader (counts, paging) on stderr, so stdout keeps only the rows."""
    stderr.print(text, highlight=False, markup=False, soft_wrap=True)


def _index_engine(engine: str, address: Optional[str], num_workers: Optional[int], gpus_per_worker: float):
    """The ``engine`` argument of :func:`atlasq.indexer.build_index` for the index command's options."""
    if engine == "local":
        if address is not None or num_workers is not None or gpus_per_worker:
            raise InvalidOptionError("--ray-address, --num-workers and --gpus-per-worker need --engine ray")
        return None
    if engine != "ray":
        raise InvalidOptionError(f"--engine must be local or ray, not {engine!r}")
    from .ray_engine import RayEngine

    return RayEngine(address=address, num_workers=num_workers, gpus_per_worker=gpus_per_worker)


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
    engine: str = typer.Option(
        "local", help="local (threads in this process) or ray (a Ray Data actor pool; pip install 'atlasq[ray]')."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="With --engine ray: auto (the cluster this machine is in) or a cluster address.",
        show_default="a local Ray for this run"),
    num_workers: Optional[int] = typer.Option(
        None, "--num-workers", help="With --engine ray: actors decoding and embedding.",
        show_default="one per CPU, or per --gpus-per-worker GPUs"),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="With --engine ray: GPUs per actor."),
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
                          approx_threshold=approx_threshold,
                          engine=_index_engine(engine, ray_address, num_workers, gpus_per_worker))
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

        _hint(f"query {display_path(r['query'])} ({r['search']} search, cosine similarity of pooled vectors)")
        if not r["hits"]:
            _hint("no other image in the index")
            return
        _print_table(["rank", "score", "id", "top class", "path"],
                     [[n, f"{hit['score']:.4f}", str(hit["id"]), hit["top_class"] or "–", display_path(hit["path"])]
                      for n, hit in enumerate(r["hits"], 1)], right=(0, 1, 2))
        more = f"; -k {2 * r['k']} for more" if len(r["hits"]) == r["k"] else " (all the index has)"
        _hint(f"showing the {len(r['hits'])} nearest images{more}")

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
        from .images import display_path

        dims = r["layer_dims"] or {}
        weights = r["weights"] or "default"
        if r["weights_sha256"]:
            weights += f" (sha256 {r['weights_sha256'][:12]}…)"
        if r["random_weights"]:
            weights += ": RANDOM, for tests and smoke runs only"
        _print_pairs([
            ("index", r["name"]), ("folder", display_path(r["folder"])),
            ("images from", display_path(r["root"]) if r["root"] else "–"),
            ("images", r["images"]), ("sampled activations", r["samples"]), ("errors", r["errors"]),
            ("model", r["model"]), ("weights", weights),
            ("layers", ", ".join(f"{layer} ({dims[layer]:,} channels)" if layer in dims else layer
                                 for layer in r["layers"] or []) or "–"),
            ("samples per image", r["samples_per_image"]),
            ("attributions", "stored" + (", max-pools relaxed" if r["relaxed_maxpool"] else "")
             if r["attributions"] else "not stored (atlas build needs them: index with --attributions)"),
            ("seed", str(r["seed"]) if r["seed"] is not None else "–"),
            ("search index", "current" if r["faiss_current"] else "not current"),
            ("atlasq version", r["atlasq_version"] or "–"),
        ])
        errors = r["error_list"]
        if errors:
            print()
            _print_table(["file not indexed", "why"],
                         [[display_path(path), display_path(reason)] for path, reason in errors[:20]])
            if len(errors) > 20:
                _hint(f"showing 20 of {len(errors):,} errors; --json lists them all")

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

    say = lambda text: stderr.print(text, highlight=False, markup=False, soft_wrap=True)
    result = run_demo(home=home, name=name, progress=not as_json, say=say)

    def human(r):
        from .images import display_path

        q, a = r["example_search"], r["atlas"]
        _hint(f"the images nearest to {display_path(q['query'])}:")
        _print_table(["rank", "score", "top class", "path"],
                     [[n, f"{hit['score']:.4f}", hit["top_class"] or "–", display_path(hit["path"])]
                      for n, hit in enumerate(q["hits"], 1)], right=(0, 1))
        _hint(f"atlas {a['name']} ({'reused' if a['reused'] else 'built'}) at layer {a['layer']}: "
              f"{display_path(a['folder'])}")
        _hint(f"more: atlasq atlas info {a['name']}    atlasq search PATH --index {r['index']['name']}")
        stderr.print(Text.assemble(("open it: ", "bold"), r["app_command"]), highlight=False, soft_wrap=True)

    _emit(as_json, result, human)
    if as_json:
        say(f"open it: {result['app_command']}")


@app.command("demo-model")
@user_errors
def demo_model_command(
    force: bool = typer.Option(False, help="Retrain even when cached weights exist."),
    ship: bool = typer.Option(False, help="Also copy the weights into the package (atlasq/data), replacing "
                                          "those shipped before: for maintainers, after changing the recipe."),
    as_json: bool = JsonOption,
):
    """Train (or find cached) the small demo network on sample_data/ and report its held-out accuracy."""
    from . import demo_model

    path = demo_model.ensure_trained(force=force)
    if ship:
        demo_model.ship(path)
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
        def human(r):
            for a in r["built"]:
                print(f"atlas {a['name']} at layer {a['layer']}: {a['activations']:,} activations; "
                      + ", ".join(f"{g}×{g} {f['cells']} cells" for g, f in a["levels"].items()))

        _emit(as_json, {"built": [s.to_dict() for s in built]}, human)  # one atlas per layer
        return
    summary = build_atlas(index_name, name, home=home, options=options, device=device,
                          overwrite=overwrite, progress=not as_json or sys.stderr.isatty())

    def human(r):
        stderr.print(f"atlas {r['name']} of index {r['index']} at {r['folder']}: {r['activations']:,} "
                     f"activations of {r['layer']}", highlight=False)
        if r["random_weights"]:
            stderr.print("[yellow]built with RANDOM weights: for tests and smoke runs only[/yellow]")
        fidelity = r.get("icon_fidelity") or {}
        _print_table(["level", "kept cells", "dropped", "icon fidelity"],
                     [[f"{g}×{g}", facts["cells"], facts["dropped_cells"],
                       f"{fidelity[g]:.2f}" if g in fidelity else "–"] for g, facts in r["levels"].items()],
                     right=(1, 2, 3))
        print(f"icons: {r['icons_rendered']:,} rendered, {r['icons_reused']:,} reused; seconds: {_human(r['seconds'])}")

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
        from .atlasdir import AtlasFolder
        from .images import display_path

        manifest = AtlasFolder(r["folder"]).read_manifest()  # what --json leaves out: fidelity, drops
        fidelity, facts = manifest.get("icon_fidelity") or {}, manifest.get("levels") or {}
        options = dict(r["options"] or {})
        weights = r["weights"] or "default"
        if r["random_weights"]:
            weights += ": RANDOM, for tests and smoke runs only"
        activations = f"{r['activations']:,}" if r["activations"] is not None else "–"
        if r["index_activations"]:
            activations += f" of the index's {r['index_activations']:,}"
        _print_pairs([
            ("atlas", r["name"]), ("folder", display_path(r["folder"])), ("index", r["index"]),
            ("model", r["model"]), ("weights", weights), ("layer", r["layer"]),
            ("activations", activations),
            ("icons", f"{r['icon_size']} px, {r['icon_precision']}, {options.pop('steps', '?')} steps, "
                      f"{options.pop('objective', '?')} objective" if options.get("icons", True) and r["icon_size"]
                      else "none (built with --no-icons)"),
            ("grids", ", ".join(f"{g}×{g}" for g in options.pop("grids", []))),
            ("options", {k: v for k, v in options.items() if k not in ("layer", "icons")}),
            ("build seconds", r["seconds"]), ("created", r["created"] or "–"),
            ("atlasq version", r["atlasq_version"] or "–"),
        ] + ([("kind", r["kind"]), ("analysis", r.get("analysis") or {})] if r.get("kind") else []))
        print()
        rows = []
        for level in r["levels"]:
            g = str(level["size"])
            dropped = (facts.get(g) or {}).get("dropped_cells")
            rows.append([f"{g}×{g}", level["cells"], "–" if dropped is None else dropped, level["activations"],
                         f"{fidelity[g]:.2f}" if g in fidelity else "–",
                         ", ".join(f"{label} ({n})" for label, n in level["top_labels"][:5])])
        _print_table(["level", "kept cells", "dropped", "activations", "icon fidelity", "most common top labels (cells)"],
                     rows, right=(1, 2, 3, 4))
        _hint(f"icon fidelity: the share of a level's icons closer to their own cell's mean activation than to "
              f"any other cell's; dropped: cells with fewer than {_human(options.get('min_count'))} activations")

    _emit(as_json, result, human)


@atlas_app.command("export")
@user_errors
def atlas_export(
    name: str = typer.Argument(..., help="Atlas name (or folder)."),
    file: Path = typer.Argument(..., help="The file to write (a tar archive with a checksummed manifest)."),
    compact: bool = typer.Option(
        False, "--compact", help="Ship a compressed placement index instead of the raw reference activations."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Pack a finished atlas into one file, to place datasets on it elsewhere.

    Example: atlasq atlas export imagenet-4c imagenet-4c.atlas --compact
    """
    from .bundle import export_atlas

    summary = export_atlas(name, file, home=home, compact=compact, progress=not as_json or sys.stderr.isatty())

    def human(r):
        extra = (f"; placement index {r['placement_index_bytes']:,} bytes = {r['placement_size_ratio']} of the raw "
                 f"activations' {r['raw_activations_bytes']:,}" if r["compact"] else "")
        print(f"atlas {r['atlas']} → {r['file']}: {r['members']} files, {r['bytes']:,} bytes{extra}")

    _emit(as_json, summary.to_dict(), human)


@atlas_app.command("import")
@user_errors
def atlas_import(
    file: Path = typer.Argument(..., help="A file written by `atlasq atlas export`."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the imported atlas.",
                                       show_default="the name it was exported under"),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """Unpack an exported atlas into the home, checking every file's sha256 first.

    Example: atlasq atlas import imagenet-4c.atlas --name imagenet
    """
    from .bundle import import_atlas

    summary = import_atlas(file, name=name, home=home)

    def human(r):
        print(f"atlas {r['atlas']} imported at {r['folder']}: {r['members']} files checked, model {r['model']}, "
              f"layer {r['layer']}{' (compact)' if r['compact'] else ''}")

    _emit(as_json, summary.to_dict(), human)
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
# the options the class and two-class commands share (one declaration each)
_AnalysisLayer = typer.Option(None, "--layer", help="The index's sampled layer." + _atlas_default("layer"))
_AnalysisSteps = typer.Option(None, "--steps", help="Optimisation steps per icon." + _atlas_default("steps"))
_AnalysisIconSize = typer.Option(None, "--icon-size", help="Icon side in px [80 at 224-px input].")
_AnalysisIcons = typer.Option(None, "--icons/--no-icons", help="Render feature-visualization icons.", show_default=False)
_AnalysisSeed = typer.Option(None, "--seed", help="Seeds the layout and the icons." + _atlas_default("seed"))
_AnalysisOverwrite = typer.Option(False, "--overwrite", help="Replace an existing atlas of that name.")
_AnalysisDevice = typer.Option("auto", "--device", help="auto, cpu, cuda …")


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
    layer: Optional[str] = _AnalysisLayer,
    grids: Optional[str] = _AnalysisGrids,
    min_count: Optional[int] = _AnalysisMinCount,
    steps: Optional[int] = _AnalysisSteps,
    icon_size: Optional[int] = _AnalysisIconSize,
    icons: Optional[bool] = _AnalysisIcons,
    seed: Optional[int] = _AnalysisSeed,
    overwrite: bool = _AnalysisOverwrite,
    device: str = _AnalysisDevice,
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
    layer: Optional[str] = _AnalysisLayer,
    grids: Optional[str] = _AnalysisGrids,
    min_count: Optional[int] = _AnalysisMinCount,
    steps: Optional[int] = _AnalysisSteps,
    icon_size: Optional[int] = _AnalysisIconSize,
    icons: Optional[bool] = _AnalysisIcons,
    seed: Optional[int] = _AnalysisSeed,
    overwrite: bool = _AnalysisOverwrite,
    device: str = _AnalysisDevice,
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
        g = result.level
        print(f"{t.activations:,} activations of {t.images:,} images at level {g}×{g}: "
              f"{t.off_atlas:,} off-atlas ({t.off_atlas_share:.1%}), {t.outside_kept_cells:,} outside kept cells")
        filled = sorted((c for c in result.cells if c.activations), key=lambda c: -c.activations)
        if filled and top:
            _print_table(["cell", "activations", "images", "share", "top classes"],
                         [[f"{c.i},{c.j}", c.activations, c.images, f"{c.share:.1%}", ", ".join(c.top_labels[:3])]
                          for c in filled[:top]], right=(0, 1, 2, 3))
        more = f"; --top {len(filled)} lists them all" if len(filled) > top else ""
        _hint(f"showing {min(top, len(filled)):,} of the {len(filled):,} cells that hold activations, fullest first; "
              f"{len(result.cells) - len(filled):,} kept cells hold none{more}")
        stderr.print(f"heat map: {result.picture}", highlight=False, markup=False)

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
    from .atlas import load_atlas
    from .histogram import cell_images

    i, j = _cell(cell)
    reference = load_atlas(atlas, home)
    result = cell_images(reference, index_name, i, j, level=level, k=k, offset=offset, home=home)

    def human(_):
        from .images import display_path

        g, shown = result.level, len(result.images)
        if reference.cell_row(g, i, j) is None:  # not a kept cell of the atlas: say why it has no images
            table = reference.reference
            members = int(((table[f"cell_{g}_i"].to_numpy() == i) & (table[f"cell_{g}_j"].to_numpy() == j)).sum())
            minimum = reference.manifest["options"]["min_count"]
            why = (f"dropped: only {members:,} of the atlas's reference activations fall in it, fewer than its "
                   f"minimum of {minimum:,} per cell" if members else "empty: no reference activation falls in it")
            _hint(f"cell {i},{j} of level {g}×{g} is not on the atlas ({why}), so no image is placed in it")
            return
        labels = ", ".join(f"{label} ({score:+.3g})" for label, score in zip(result.top_labels[:3], result.top_scores))
        _hint(f"cell {i},{j} of level {g}×{g}; top classes by attribution: {labels}")
        if not shown:
            _hint(f"no image of {result.index} here" if not result.total_images
                  else f"no images after --offset {result.offset:,} (the cell holds {result.total_images:,})")
            return
        _print_table(["rank", "distance", "activations", "positions (y,x)", "path"],
                     [[result.offset + n, f"{m.cell_distance:.4f}", m.activations,
                       " ".join(f"({p['y']},{p['x']})" for p in m.positions), display_path(m.path)]
                      for n, m in enumerate(result.images, 1)], right=(0, 1, 2))
        more = f"; --offset {result.offset + shown} for the next page" if result.has_more else ""
        _hint(f"showing images {result.offset + 1:,}–{result.offset + shown:,} of {result.total_images:,}, most "
              f"typical first (distance: cosine distance of the image's best activation to the cell's mean){more}")

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
            print()
            if not rows:
                print(f"{title}: no cell")
                continue
            print(title + ":")
            _print_table(["cell", f"share in {r.a}", f"share in {r.b}", "log2 ratio", "q", "top classes"],
                         [[f"{c.i},{c.j}", f"{c.share_a:.2%}", f"{c.share_b:.2%}", f"{c.log2_ratio:+.2f}",
                           f"{c.q:.2g}", ", ".join(c.top_labels[:3])] for c in rows], right=(0, 1, 2, 3, 4))
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
@app.command("inspect")
@user_errors
def inspect_command(
    image: str = typer.Argument(..., help="An indexed image (id or path) or any image file."),
    index_name: str = typer.Option(..., "--index", help="Index whose network (model and weights) to use."),
    atlas: Optional[str] = typer.Option(None, "--atlas", help="Atlas whose icons draw the activation grid "
                                                              "(its layer is the layer)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Layer [the atlas's; else mixed4d, or the "
                                                              "network's deepest mixed4 layer]."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class names or indices "
                                                                  "[the top 3 by logit]."),
    groups: int = typer.Option(6, "--groups", help="Neuron groups (NMF components)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the factorization and the icons."),
    from_layer: Optional[str] = typer.Option(None, "--from-layer", help="Earlier layer for layer-to-layer "
                                                                        "attribution."),
    position: Optional[str] = typer.Option(None, "--position", help="Position y,x of the layer that "
                                                                    "--from-layer attributes to [the strongest]."),
    level: Optional[int] = typer.Option(None, "--level", help="Atlas grid size G [the atlas's coarsest]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimisation steps of new icons [256]."),
    no_render: bool = typer.Option(False, "--no-render", help="Draw icons not yet cached as blanks "
                                                              "instead of rendering them."),
    out: Path = typer.Option(..., "--out", help="Folder for interface.png, inspect.json and inspect.npz."),
    home: Optional[Path] = HomeOption,
    as_json: bool = JsonOption,
):
    """The Building Blocks interface for one image: activation grid, spatial and channel attribution, neuron groups."""
    from .api import inspect_image

    where = None
    if position:
        try:
            where = tuple(int(v) for v in position.split(","))
        except ValueError:
            where = ()
        if len(where) != 2:
            raise InvalidOptionError(f"--position must be y,x (two integers), not {position!r}")
    result = inspect_image(image, index_name, out=out, home=home, atlas=atlas, layer=layer,
                           classes=_split_csv(classes), groups=groups, seed=seed, from_layer=from_layer,
                           position=where, level=level, icon_steps=steps, render=not no_render)

    def human(r):
        print(f"{r['source']} at {r['layer']} ({r['model']}):")
        for c in r["classes"]:
            channels = ", ".join(f"{t['channel']} ({t['attribution']:+.3g})" for t in c["top_channels"])
            print(f"  {c['class']:<20} p={c['probability']:.3f}  attribution {c['attribution_total']:+.3g}  "
                  f"top channels {channels}")
        for g in r["groups"]:
            parts = ", ".join(f"{k} {v:+.3g}" for k, v in g["attribution"].items())
            print(f"  group {g['group']}: {g['activation_share']:.0%} of the activation; {parts}")
        stderr.print(f"written: {', '.join(r['files'].values())}", highlight=False)

    _emit(as_json, result, human)


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
    env = serve.app_environment()
    if os.name == "posix":  # Streamlit takes this process's place, so Ctrl-C and signals reach it directly
        os.execve(command[0], command, env)
    raise typer.Exit(subprocess.call(command, env=env))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
