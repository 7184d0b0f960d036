"""Images a collection owns, stored content-addressed under its `media/` folder.

`media/<sha256[:2]>/<sha256><suffix>`: the same bytes always land on the same file, so an upload
posted twice is written once. A file is written to a temporary name, fsynced, renamed into place and
its folder fsynced, before the catalog commit that names it: a crash leaves either no file, an
unreferenced whole file (harmless, reused by the next upload of those bytes), or the committed item
with its whole file; never a committed item with a partial file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from clipsearch.manifest import atomic_write_bytes

# PIL format name -> the suffix its files get
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
            "MPO": ".jpg", "ICO": ".ico", "PPM": ".ppm", "TGA": ".tga"}


def suffix_for(pil_format: str | None) -> str:
    if not pil_format:
        return ".img"
    return SUFFIXES.get(pil_format.upper(), "." + "".join(c for c in pil_format.lower() if c.isalnum())[:8])


def is_owned_media(path: str) -> bool:
    """Whether an item's path names media its collection owns (relative: collections/<name>/media/...)."""
    parts = Path(path).parts
    return not Path(path).is_absolute() and len(parts) >= 3 and parts[0] == "collections" and parts[2] == "media"


def media_path(media_dir: Path, sha256: str, suffix: str) -> Path:
    return media_dir / sha256[:2] / f"{sha256}{suffix}"


def store_media(media_dir: Path, data: bytes, suffix: str, sha256: str | None = None) -> tuple[Path, str]:
    """Write `data` (if not there already) and return (its path, its sha256). `sha256`: the bytes'
    digest where the caller already has it (an upload is hashed once)."""
    sha = sha256 or hashlib.sha256(data).hexdigest()
    path = media_path(media_dir, sha, suffix)
    if path.is_file() and path.stat().st_size == len(data):
        return path, sha
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)  # temp file + fsync + rename
    _fsync_dir(path.parent)  # the rename itself survives a power cut
    return path, sha


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
