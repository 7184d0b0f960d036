"""Small JPEG thumbnails of collection images, made once and kept in a bounded LRU.

A result page shows many images: each thumbnail is decoded with the same safe decoder as uploads
(pixel cap, EXIF rotation), shrunk to `max_px` on its longest side and kept by (collection, image id,
the file's size and mtime), so a changed file gets a new thumbnail and a new ETag.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache
from PIL import Image

from clipsearch.images import decode_image


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    etag: str


def make_thumbnail(path: Path, max_px: int, max_pixels: int) -> bytes:
    image = decode_image(path, max_pixels=max_pixels)
    try:
        image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=82, optimize=True)
        return buf.getvalue()
    finally:
        image.close()


class ThumbnailCache:
    def __init__(self, maxsize: int, max_px: int, max_pixels: int):
        self.max_px = max_px
        self.max_pixels = max_pixels
        self._lru: LRUCache[tuple, Thumbnail] | None = LRUCache(maxsize) if maxsize > 0 else None
        self._lock = threading.Lock()

    def get(self, collection: str, image_id: str, path: Path) -> Thumbnail:
        """The thumbnail of `path` (decoding it on a miss); raises ImageDecodeError / OSError."""
        st = path.stat()
        key = (collection, image_id, st.st_size, st.st_mtime_ns, self.max_px)
        if self._lru is not None:
            with self._lock:
                hit = self._lru.get(key)
            if hit is not None:
                return hit
        data = make_thumbnail(path, self.max_px, self.max_pixels)
        thumb = Thumbnail(data, '"' + hashlib.sha256(repr(key).encode() + data).hexdigest()[:24] + '"')
        if self._lru is not None:
            with self._lock:
                self._lru[key] = thumb
        return thumb

    def clear(self) -> None:
        if self._lru is not None:
            with self._lock:
                self._lru.clear()
