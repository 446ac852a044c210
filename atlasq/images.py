"""Find image files under a folder and decode them robustly.

:func:`open_rgb` turns every file (empty, not an image, truncated, a bomb,
16-bit, CMYK, rotated, ...) into either a fully loaded ``RGB`` image or an
:class:`ImageDecodeError` whose short, stable ``reason`` the caller records.

Nothing here changes Pillow's global settings.  Truncation detection relies on
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeping its default (``False``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

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
    """One image file found by :func:`scan_images`.

    Attributes
    ----------
    path : str
        Path relative to the scanned root, with POSIX separators.
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


def scan_images(root: Path) -> list[FileEntry]:
    """List image files under ``root``, recursively, sorted by path.

    Suffixes are matched case-insensitively against :data:`IMAGE_SUFFIXES`.
    Skips hidden names (leading ``"."``) and unreadable subdirectories;
    directory symlinks are not followed, file symlinks are.

    Parameters
    ----------
    root : Path
        Folder to scan.

    Returns
    -------
    list of FileEntry
        Sorted by ``path``.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    NotADirectoryError
        If ``root`` is not a directory.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image root does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"image root is not a directory: {root}")
    entries: list[FileEntry] = []
    pending = [str(root)]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                items = list(listing)
        except OSError:
            if directory == str(root):
                raise
            continue
        entries.extend(_image_entries(items, root, pending))
    entries.sort(key=lambda entry: entry.path)
    return entries


def _image_entries(items: list[os.DirEntry], root: Path, pending: list[str]) -> list[FileEntry]:
    """Return entries for the image files in ``items``; queue subdirectories."""
    found = []
    for item in items:
        if item.name.startswith("."):
            continue
        try:
            if item.is_dir(follow_symlinks=False):
                pending.append(item.path)
                continue
            suffix = os.path.splitext(item.name)[1].lower()
            if suffix not in IMAGE_SUFFIXES or not item.is_file():
                continue
            info = item.stat()
        except OSError:  # vanished or unreadable meanwhile
            continue
        relative = PurePath(os.path.relpath(item.path, root)).as_posix()
        found.append(FileEntry(relative, info.st_size, info.st_mtime))
    return found


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
        if _orientation(im) in (5, 6, 7, 8):  # EXIF says the picture is turned a quarter
            width, height = height, width
        if min_side is not None and isinstance(im, JpegImagePlugin.JpegImageFile):
            # draft() picks the largest scale s in {8, 4, 2, 1} with
            # s <= side // min_side for both sides, so neither drops below.
            im.draft(None, (min_side, min_side))
        im.load()
        _apply_orientation(im)
        rgb = _to_rgb(im)
        rgb.info["original_size"] = (width, height)  # before any draft() reduction
        return rgb


def _orientation(im: Image.Image) -> int:
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
