"""``atlasq atlas export`` / ``atlasq atlas import``: a finished atlas as one checksummed file.

A team builds its reference atlas once and ships it. The file is a plain tar archive (readable by
any tar tool; its members are mostly PNG, parquet and float16 arrays that would barely compress)::

    atlasq-bundle.json      first member: format, the atlas's model, weights (name and sha256),
                            layer, whether it is compact, and the sha256 and size of every member
    atlas/<file>            the atlas folder's files (see :mod:`atlasq.atlasdir`)

Import reads the manifest first, then extracts every member into a scratch folder of the home,
checking each one's size and sha256 as it is written; any mismatch, missing, extra or unsafe
member, or a truncated archive is refused as :class:`DamagedError` and the scratch folder is
deleted. Only a complete, verified atlas is renamed into the home's atlases (one rename, so
nothing half-imported is ever visible).

``--compact`` leaves out the raw reference activations (the bulk of an atlas: C × 2 bytes per
reference activation) and ships a compressed placement index instead (see
:func:`atlasq.histogram.compact_reference_index`), with its off-atlas threshold learned from
that index. Placement (``atlasq histogram``) and the app work from a compact atlas; what needs the
raw activations says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .atlasdir import AtlasError, AtlasFolder
from .errors import DamagedError, IncompatibleError, InvalidOptionError, NotFoundError
from .fileio import replaced
from .home import check_name, default_home, mark_home, scratch_folder

__all__ = ["BUNDLE_FORMAT", "ExportSummary", "ImportSummary", "export_atlas", "import_atlas", "read_bundle_manifest"]

BUNDLE_FORMAT = 1
BUNDLE_MANIFEST = "atlasq-bundle.json"
MEMBER_PREFIX = "atlas/"
_CHUNK = 1 << 20


@dataclass
class ExportSummary:
    atlas: str
    file: str
    compact: bool
    members: int
    bytes: int
    raw_activations_bytes: int = 0    # what the full export carries as reference activations
    placement_index_bytes: int = 0    # what the compact export carries instead
    placement_size_ratio: float | None = None  # placement_index_bytes / raw_activations_bytes (compact only)
    placement: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImportSummary:
    atlas: str
    folder: str
    file: str
    compact: bool
    members: int
    bytes: int
    model: str
    layer: str
    weights_sha256: str | None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- export

def export_atlas(atlas: str | Path, file: Path, *, home: Path | None = None, compact: bool = False,
                 progress: bool = False) -> ExportSummary:
    """Write the finished atlas ``atlas`` (name or folder) to ``file`` (replaced atomically).

    With ``compact``, the raw reference activations stay behind and a compressed placement index
    travels instead; the source atlas is only read, never changed."""
    from .atlas import load_atlas

    clock = time.perf_counter()
    loaded = load_atlas(atlas, home)
    files = loaded.files
    manifest = dict(loaded.manifest)
    if manifest.get("compact") and not compact:
        compact = True  # a compact atlas has no raw activations to ship: it stays compact
    file = Path(file)
    if file.is_dir():
        raise InvalidOptionError(f"{file} is a folder; give the export's file name (e.g. {file / (loaded.name + '.atlas')})")
    if not file.parent.is_dir():
        raise NotFoundError(f"cannot write {file}: folder {file.parent} does not exist")
    members = files.packed_files(activations=not compact, placement=not compact)
    summary = ExportSummary(atlas=loaded.name, file=str(file), compact=compact, members=0, bytes=0)
    with tempfile.TemporaryDirectory(prefix="atlasq-export-") as scratch:
        extra: dict[str, Path] = {}
        if compact:
            extra, facts = _compact_placement(loaded, Path(scratch), progress)
            summary.raw_activations_bytes = facts.pop("raw_activations_bytes")
            summary.placement_index_bytes = facts["index_bytes"]
            summary.placement_size_ratio = round(facts["index_bytes"] / max(1, summary.raw_activations_bytes), 4)
            summary.placement = facts
            if not manifest.get("compact"):
                manifest["compact"] = {"placement": facts["kind"], "size_ratio": summary.placement_size_ratio,
                                       "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest_name = files.manifest_name()
        sources = {name: files.folder / name for name in members if name not in extra and name != manifest_name}
        sources.update(extra)
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        records = {name: {"sha256": _sha256_file(path), "bytes": path.stat().st_size} for name, path in sources.items()}
        records[manifest_name] = {"sha256": hashlib.sha256(manifest_bytes).hexdigest(), "bytes": len(manifest_bytes)}
        bundle = {"format": BUNDLE_FORMAT, "kind": "atlasq-atlas", "name": loaded.name,
                  "model": manifest.get("model"), "weights": manifest.get("weights"),
                  "weights_sha256": manifest.get("weights_sha256"),
                  "random_weights": bool(manifest.get("random_weights")), "layer": manifest.get("layer"),
                  "compact": bool(manifest.get("compact")), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "members": dict(sorted(records.items()))}
        with replaced(file) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, BUNDLE_MANIFEST, json.dumps(bundle, indent=1).encode())
            _add_bytes(tar, MEMBER_PREFIX + manifest_name, manifest_bytes)
            for name, path in sorted(sources.items()):
                tar.add(path, arcname=MEMBER_PREFIX + name, recursive=False)
    summary.members = len(records)
    summary.bytes = file.stat().st_size
    summary.seconds = round(time.perf_counter() - clock, 2)
    return summary


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _compact_placement(atlas, scratch: Path, progress: bool) -> tuple[dict[str, Path], dict]:
    """The compressed placement index and its record, written under ``scratch`` with the atlas
    folder's names; and what to report about it."""
    import faiss

    from .histogram import OFF_ATLAS_QUANTILE, ReferenceSearch, compact_reference_index
    from .layout import unit_rows
    from .progress import stderr

    activations = atlas.activations()
    with stderr.status(f"training a compact placement index on {len(activations):,} reference activations…") \
            if progress else nullcontext():
        index = compact_reference_index(unit_rows(activations))
        search = ReferenceSearch(atlas, index)  # learns the off-atlas threshold through this index
    index_name, record_name = atlas.files.placement_names()
    faiss.write_index(index, str(scratch / "placement.index"))
    record = {"params_hash": atlas.manifest.get("params_hash"), "kind": search.kind,
              "quantile": OFF_ATLAS_QUANTILE, "threshold": search.threshold}
    (scratch / "placement.record").write_text(json.dumps(record, indent=1))
    facts = {"kind": search.kind, "threshold": search.threshold, "index_bytes": (scratch / "placement.index").stat().st_size,
             "raw_activations_bytes": int(activations.nbytes)}
    return {index_name: scratch / "placement.index", record_name: scratch / "placement.record"}, facts


# ----------------------------------------------------------------------------- import

def read_bundle_manifest(file: Path) -> dict:
    """The manifest of an export file (its first member), or :class:`DamagedError` saying why not."""
    with _open_bundle(Path(file)) as tar:
        return _bundle_manifest(tar, Path(file))


def _open_bundle(file: Path) -> tarfile.TarFile:
    if not file.is_file():
        raise NotFoundError(f"no atlas export at {file}")
    try:
        return tarfile.open(file, "r:")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DamagedError(f"{file} is not an atlasq atlas export, or it is damaged ({exc})") from exc


def _bundle_manifest(tar: tarfile.TarFile, file: Path) -> dict:
    try:
        first = tar.next()
        if first is None or first.name != BUNDLE_MANIFEST or not first.isfile():
            raise DamagedError(f"{file} is not an atlasq atlas export: its first member is not {BUNDLE_MANIFEST}")
        manifest = json.loads(tar.extractfile(first).read())
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise DamagedError(f"{file} is damaged: its manifest cannot be read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != "atlasq-atlas" or not isinstance(
            manifest.get("members"), dict):
        raise DamagedError(f"{file} is not an atlasq atlas export (its manifest is not one)")
    if not isinstance(manifest.get("format"), int) or manifest["format"] > BUNDLE_FORMAT:
        raise IncompatibleError(f"{file} is an atlas export of format {manifest.get('format')!r}, written by a "
                                f"newer atlasq; this one reads format {BUNDLE_FORMAT}. Upgrade atlasq")
    return manifest


def _safe_member(name: str) -> str | None:
    """The atlas-relative path of archive member ``name``, or None when it is not one (absolute,
    ``..``, outside ``atlas/``)."""
    if not name.startswith(MEMBER_PREFIX):
        return None
    relative = PurePosixPath(name[len(MEMBER_PREFIX):])
    if relative.is_absolute() or not relative.parts or any(part in ("", ".", "..") for part in relative.parts):
        return None
    return relative.as_posix()


def import_atlas(file: Path, *, name: str | None = None, home: Path | None = None) -> ImportSummary:
    """Import the atlas in export ``file`` into the home (as ``name``, else the name it was exported
    under). Every member is checked against the manifest's sha256 and size while it is extracted
    into a scratch folder; only a complete, verified atlas is renamed into place."""
    clock = time.perf_counter()
    file = Path(file)
    with _open_bundle(file) as tar:
        bundle = _bundle_manifest(tar, file)
        name = check_name(name or str(bundle.get("name") or ""), "atlas")
        target = AtlasFolder.named(name, home)
        if target.folder.exists():
            raise AtlasError(f"atlas {name!r} already exists at {target.folder}; import under another --name, or "
                             f"remove that atlas first")
        mark_home(Path(home or default_home()))
        scratch = scratch_folder(home)
        scratch.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"import-{name}-", dir=scratch))
        try:
            total = _extract_verified(tar, bundle, work, file)
            files = AtlasFolder(work)
            manifest = files.read_manifest()
            for key in ("model", "weights_sha256", "layer"):
                if manifest.get(key) != bundle.get(key):
                    raise DamagedError(f"{file} is damaged: its manifest says {key}={bundle.get(key)!r}, the "
                                       f"atlas inside {manifest.get(key)!r}")
            if manifest.get("name") != name:  # placements are recorded under the atlas's name
                files.finish({**manifest, "name": name, "imported_as": name,
                              "exported_name": manifest.get("name")})
            target.folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                work.rename(target.folder)
            except OSError as exc:
                raise AtlasError(f"cannot move the imported atlas into {target.folder} ({exc.strerror or exc})") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return ImportSummary(atlas=name, folder=str(target.folder), file=str(file), compact=bool(bundle.get("compact")),
                         members=len(bundle["members"]), bytes=total, model=str(manifest.get("model")),
                         layer=str(manifest.get("layer")), weights_sha256=manifest.get("weights_sha256"),
                         seconds=round(time.perf_counter() - clock, 2))


def _extract_verified(tar: tarfile.TarFile, bundle: dict, work: Path, file: Path) -> int:
    """Extract every member into ``work``, checking it against ``bundle``; the bytes written."""
    expected = bundle["members"]
    seen: set[str] = set()
    total = 0
    try:
        for member in tar:  # from the first member again: tarfile keeps the ones already read
            if member.name == BUNDLE_MANIFEST and member.offset == 0:
                continue
            relative = _safe_member(member.name)
            if relative is None or relative not in expected or not member.isfile():
                raise DamagedError(f"{file} holds {member.name!r}, which its manifest does not list; refused")
            if relative in seen:
                raise DamagedError(f"{file} holds {member.name!r} twice; refused")
            seen.add(relative)
            want = expected[relative]
            if member.size != want.get("bytes"):
                raise DamagedError(f"{file} is damaged: {relative} is {member.size} bytes, its manifest says "
                                   f"{want.get('bytes')}")
            target = work / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            source = tar.extractfile(member)
            written = 0
            with open(target, "wb") as out:
                for block in iter(lambda: source.read(_CHUNK), b""):
                    digest.update(block)
                    out.write(block)
                    written += len(block)
            if written != want["bytes"]:
                raise DamagedError(f"{file} is truncated: {relative} ends after {written} of {want['bytes']} bytes")
            if digest.hexdigest() != want.get("sha256"):
                raise DamagedError(f"{file} is damaged: the sha256 of {relative} is not the one its manifest records")
            total += written
    except (tarfile.TarError, EOFError) as exc:
        raise DamagedError(f"{file} is truncated or damaged ({exc}); nothing was imported") from exc
    missing = sorted(set(expected) - seen)
    if missing:
        raise DamagedError(f"{file} is truncated: {len(missing)} of its {len(expected)} files are missing "
                           f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}); nothing was imported")
    return total
