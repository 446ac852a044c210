r"""Find image files under a folder and decode them robustly.

:func:`open_rgb` turns every file (empty, not an image, truncated, a bomb,
16-bit, CMYK, rotated, ...) into either a fully loaded ``RGB`` image or an
:class:`ImageDecodeError` whose short, stable ``reason`` the caller records.

Nothing here changes Pillow's global settings.  Truncation detection relies on
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeping its default (``False``).

:func:`scan_folder` lists the image files under a folder and says what it could not list
(unreadable folders, dangling symlinks) and which atlasq homes it left out.

**Stored paths.** A path is stored relative to the scanned root as text that is always valid
UTF-8 and always one line (:func:`path_key`): a backslash is written ``\\``, a byte that is not
UTF-8 ``\xNN`` (NN >= 80), an ASCII control character ``\xNN`` (NN < 80), any other control
or line/paragraph separator ``\uNNNN``; everything else, including any other non-ASCII name, is
kept as it is. :func:`real_path` turns a stored path back into the file's real name, and
:func:`display_path` makes any path safe to print on one line.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import InvalidOptionError, NotFoundError
from .home import is_home
from .store import DB_FILE

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
DEFAULT_MAX_PIXELS: int = 128_000_000

# Only the decoders that match IMAGE_SUFFIXES are tried, whatever a file's
# suffix says: a PNG named .jpg still decodes, but an EPS named .png never
# reaches Ghostscript.
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_GREY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_WHITE = (255, 255, 255)
_HASH_CHUNK = 1 << 20
_MAX_REASON = 300


@dataclass(frozen=True)
class FileEntry:
    """One image file found by :func:`scan_folder`.

    Attributes
    ----------
    path : str
        Stored path (:func:`path_key`) relative to the scanned root, with POSIX separators;
        :func:`real_path` gives the file.
    size : int
        File size in bytes.
    mtime : float
        Modification time (``st_mtime``).
    """

    path: str
    size: int
    mtime: float


class ImageDecodeError(Exception):
    """An image file could not be decoded; ``reason`` says why.

    Parameters
    ----------
    reason : str
        One of ``"empty file"``, ``"not a regular file"``, ``"not an image"``,
        ``"truncated file"``, ``"decompression bomb: ..."`` or
        ``"unreadable: <ExceptionType>: <message>"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ScanProblem:
    """Something under the scanned root that could not be listed or read as a file.

    ``path`` is a stored path (:func:`path_key`) relative to the root; ``reason`` starts with
    ``"unreadable folder"``, ``"dangling symlink"``, ``"broken symlink"`` or ``"unreadable"``.
    ``mtime`` is the entry's own (``lstat``) modification time when it could be read, else 0;
    ``folder`` says the path is a folder whose files could not be listed.
    """

    path: str
    reason: str
    mtime: float = 0.0
    folder: bool = False


@dataclass
class Scan:
    """What :func:`scan_folder` found under a root.

    entries : image files, sorted by path.
    problems : folders and links that could not be listed or followed (for the errors table).
    skipped_homes : folders left out because they are atlasq homes or index folders (their
        icons, mosaics and heat maps are atlasq's own output, not the user's images).
    """

    entries: list[FileEntry] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)
    skipped_homes: list[str] = field(default_factory=list)


def scan_images(root: Path) -> list[FileEntry]:
    """The image files under ``root``, sorted by path (see :func:`scan_folder`)."""
    return scan_folder(root).entries


def scan_folder(root: Path) -> Scan:
    """List image files under ``root``, recursively, and what could not be listed.

    Suffixes are matched case-insensitively against :data:`IMAGE_SUFFIXES`. Hidden names
    (leading ``"."``) are skipped; directory symlinks are not followed, file symlinks are.
    Unreadable subfolders, dangling or looping symlinks with an image suffix, and image files
    whose status cannot be read are reported as :class:`ScanProblem` records. Folders that are atlasq homes
    (:func:`atlasq.home.is_home`, which also knows homes from before the marker) are not
    entered, and listed in ``skipped_homes``; so are index folders themselves.

    Raises
    ------
    NotFoundError
        If ``root`` does not exist.
    InvalidOptionError
        If ``root`` is not a directory or cannot be listed.
    """
    root = Path(root)
    if not root.exists():
        raise NotFoundError(f"image folder does not exist: {display_path(root)}")
    if not root.is_dir():
        raise InvalidOptionError(f"not a folder: {display_path(root)}; give the folder that holds the images")
    scan = Scan()
    pending = [str(root)]
    while pending:
        directory = pending.pop()
        if _is_atlasq_folder(directory):
            scan.skipped_homes.append(_relative_key(directory, root))
            continue
        try:
            with os.scandir(directory) as listing:
                items = list(listing)
        except OSError as exc:
            if directory == str(root):
                raise InvalidOptionError(f"cannot list the image folder {display_path(root)}: "
                                         f"{exc.strerror or exc}") from exc
            scan.problems.append(ScanProblem(_relative_key(directory, root), f"unreadable folder: "
                                             f"{exc.strerror or exc}", _lstat_mtime(directory), folder=True))
            continue
        _list_items(items, root, pending, scan)
    scan.entries.sort(key=lambda entry: entry.path)
    scan.problems.sort(key=lambda problem: problem.path)
    scan.skipped_homes.sort()
    return scan


def _is_atlasq_folder(directory: str) -> bool:
    """Whether ``directory`` is a home (marked, or from before the marker) or an index folder."""
    return is_home(directory) or os.path.isfile(os.path.join(directory, DB_FILE))


def _relative_key(path: str, root: Path) -> str:
    return path_key(PurePath(os.path.relpath(path, root)).as_posix())


def _lstat_mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _list_items(items: list[os.DirEntry], root: Path, pending: list[str], scan: Scan) -> None:
    """Add the image files in ``items`` to ``scan`` (and what fails); queue subdirectories."""
    for item in items:
        if item.name.startswith("."):
            continue
        try:
            if item.is_dir(follow_symlinks=False):
                pending.append(item.path)
                continue
        except OSError:  # vanished meanwhile
            continue
        if os.path.splitext(item.name)[1].lower() not in IMAGE_SUFFIXES:
            continue
        try:
            info = item.stat()
        except FileNotFoundError:
            if item.is_symlink():
                scan.problems.append(ScanProblem(_relative_key(item.path, root), "dangling symlink: its target "
                                                 "does not exist", _lstat_mtime(item.path)))
            continue  # else: deleted while we listed the folder
        except OSError as exc:
            reason = "broken symlink" if item.is_symlink() else "unreadable"
            scan.problems.append(ScanProblem(_relative_key(item.path, root), f"{reason}: {exc.strerror or exc}",
                                             _lstat_mtime(item.path)))
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        scan.entries.append(FileEntry(_relative_key(item.path, root), info.st_size, info.st_mtime))


# --- stored paths ---------------------------------------------------------------------------

_KEY_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


# Exactly the characters that are escaped: Unicode's control characters (Cc), line and paragraph
# separators (Zl, Zp), surrogates (which is how Python hands over bytes that are not UTF-8), and
# for stored paths the backslash that introduces an escape.
_UNSAFE = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_TO_ESCAPE = {True: re.compile(f"[\\\\{_UNSAFE}]"), False: re.compile(f"[{_UNSAFE}]")}


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if code == 0x5C:
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as surrogateescape decodes it
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _escaped(text: str, *, backslash: bool) -> str:
    return _TO_ESCAPE[backslash].sub(_escape, text)


def path_key(relative: str | os.PathLike) -> str:
    """The stored form of a path relative to the scanned root (see the module docstring).

    Lossless: :func:`real_path` gives back the exact name, whatever bytes it holds; and a name
    that is valid UTF-8 without backslashes or control characters is stored unchanged.
    """
    name = os.fsdecode(os.fsencode(relative))  # bytes a str stands for, then text with surrogateescape
    return _escaped(PurePath(name).as_posix() if name else name, backslash=True)


def key_to_name(key: str) -> str:
    """The inverse of :func:`path_key`: the relative name as ``os`` functions take it."""
    def unescape(match: re.Match) -> str:
        code = match.group(1)
        if code == "\\":
            return "\\"
        value = int(code[1:], 16)
        if code[0] == "x" and value >= 0x80:
            return chr(0xDC00 + value)  # surrogateescape: os.fsencode turns it back into the byte
        return chr(value)
    return _KEY_ESCAPE.sub(unescape, key)


def real_path(root: Path | str, key: str) -> Path:
    """The file a stored path ``key`` (relative to ``root``) stands for on disk."""
    return Path(root) / key_to_name(key)


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as one printable line: control characters, line separators and bytes that are
    not UTF-8 are escaped as in stored paths (a stored path is printed unchanged)."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    return _escaped(os.fspath(path), backslash=False)


# Our own header check (max_pixels) replaces Pillow's bomb *warning*, which fires below
# DEFAULT_MAX_PIXELS; Pillow's bomb *error* is still wrapped as ImageDecodeError. Installed
# once at import rather than per call: warnings.catch_warnings is not thread-safe, and images
# are decoded in a thread pool.
def quiet_pil_warnings() -> None:
    """Silence Pillow's bomb warning and its "corrupt EXIF"-style notes (see above)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


quiet_pil_warnings()


def open_rgb(
    path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Decode an image file into a fully loaded ``RGB`` image.

    Applies EXIF orientation, takes the first frame, scales 16-bit grey so
    65535 maps to 255 and composites transparency onto white.

    Parameters
    ----------
    path : Path
        Image file.
    max_pixels : int, optional
        Refuse images with more pixels than this, judged from the header
        before any pixel data is decoded.  Pillow's own hard limit
        (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies on top.
    min_side : int, optional
        For JPEG files, decode at a reduced DCT scale (1/2, 1/4 or 1/8) as
        long as the shorter side stays at least ``min_side``.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, pixel data loaded, file closed.

    Raises
    ------
    ImageDecodeError
        For any file that cannot be decoded, whatever the cause.
    ValueError
        If ``min_side`` is less than 1 (a caller bug, not bad content).
    """
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")
    try:
        info = Path(path).stat()
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError("not a regular file")
        if info.st_size == 0:
            raise ImageDecodeError("empty file")
        return _decode(Path(path), max_pixels, min_side)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(_reason(exc)) from exc


def _decode(path: Path, max_pixels: int, min_side: int | None) -> Image.Image:
    """Open, check, load, orient and convert one image; errors propagate."""
    with Image.open(path, formats=_FORMATS) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"decompression bomb: {width}x{height} = {width * height} pixels"
                f" > limit {max_pixels}"
            )
        if min_side is not None and isinstance(im, JpegImagePlugin.JpegImageFile):
            # draft() picks the largest scale s in {8, 4, 2, 1} with
            # s <= side // min_side for both sides, so neither drops below.
            im.draft(None, (min_side, min_side))
        # Pixels first: any error the decoder reports must reach the caller. Reading EXIF
        # before load() is not safe: for PNG, getexif() loads the pixels itself, and the
        # error it raises there (swallowed as "corrupt EXIF") left a half-decoded image.
        im.load()
        if _orientation(im) in (5, 6, 7, 8):  # EXIF says the picture is turned a quarter
            width, height = height, width
        _apply_orientation(im)
        rgb = _to_rgb(im)
        rgb.info["original_size"] = (width, height)  # before any draft() reduction
        return rgb


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag of a loaded image (1, upright, when absent or unreadable)."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # corrupt EXIF: treated as upright, as _apply_orientation does
        return 1


def _apply_orientation(im: Image.Image) -> None:
    """Rotate/flip ``im`` in place according to its EXIF orientation tag."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # corrupt EXIF block: the pixels themselves are fine
        pass


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to ``RGB``."""
    if im.mode in _GREY16_MODES or im.mode == "F":
        return _scaled_grey(im).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _on_white(im.convert("RGBA"))
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an ``RGBA`` image onto an opaque white background."""
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _scaled_grey(im: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float grey to 8-bit ``L`` without clipping.

    Integer modes are read as 16-bit (0..65535 -> 0..255, rounded).  Float
    images with all values in [0, 1] are scaled by 255; other float images
    are clipped to 0..255, as Pillow does.
    """
    values = np.asarray(im)
    if im.mode == "F":
        values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        in_unit_range = values.size > 0 and values.min() >= 0.0 and values.max() <= 1.0
        grey = np.rint(np.clip(values * (255.0 if in_unit_range else 1.0), 0, 255))
    else:
        wide = np.clip(values, 0, 65535).astype(np.uint32)
        grey = (wide * 255 + 32767) // 65535
    return Image.fromarray(grey.astype(np.uint8))


def _reason(exc: Exception) -> str:
    """Turn an exception raised while decoding into a short reason string."""
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    # Pillow's own truncation errors are plain OSErrors without errno.
    if type(exc) is OSError and exc.errno is None and "truncated" in str(exc).lower():
        return "truncated file"
    return f"unreadable: {type(exc).__name__}: {exc}"[:_MAX_REASON]


def content_hash(path: Path) -> str:
    """Return the hex BLAKE2b digest (16 bytes, 32 hex characters) of a file.

    The file is streamed in 1 MiB chunks; ``OSError`` propagates.
    """
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CropGeometry:
    """Where a classification preset's input comes from in an image: the shorter side resized to
    ``resize_size[0]``, then a centred crop of ``crop_size``. Only arithmetic, so the app can
    outline an activation's patch on an image without loading the network (an atlas records its
    network's geometry in its manifest)."""

    resize_size: tuple[int, ...]
    crop_size: tuple[int, ...]

    def source_box(self, width: int, height: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
        """Output size (crop width, height) and the box of the ``width`` × ``height`` image that the
        resize-then-crop reads."""
        short, long = sorted((width, height))
        new_short = self.resize_size[0]
        new_long = int(new_short * long / short)  # torchvision's rounding of the long side
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        crop_h, crop_w = (list(self.crop_size) * 2)[:2]
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        sx, sy = width / new_w, height / new_h
        return (crop_w, crop_h), (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)

    def to_dict(self) -> dict:
        return {"resize_size": list(self.resize_size), "crop_size": list(self.crop_size)}

    @classmethod
    def from_dict(cls, value: dict | None) -> "CropGeometry | None":
        if not value:
            return None
        return cls(tuple(int(v) for v in value["resize_size"]), tuple(int(v) for v in value["crop_size"]))
