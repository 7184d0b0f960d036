"""The response cache: a bounded LRU behind a lock that counts its hits and misses.

Keys must say everything that changes an answer: which search, the normalised query text or the
sha256 of the uploaded bytes, k, and the index version (so a redeploy with new indexes never serves
old answers even if the cache were shared).
"""

from __future__ import annotations

import hashlib
import threading
import unicodedata
from collections.abc import Hashable
from typing import Any

from cachetools import LRUCache


def normalize_query(text: str) -> str:
    """The form of a query that is both encoded and cached: NFC, whitespace runs collapsed.

    Case is kept: whether it matters is the tokenizer's business, and the cache must not decide it.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_key(query: str, k: int, index_version: str) -> tuple[Hashable, ...]:
    return ("text", query, k, index_version)


def image_key(data: bytes, k: int, index_version: str) -> tuple[Hashable, ...]:
    return ("image", hashlib.sha256(data).hexdigest(), k, index_version)


class ResponseCache:
    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._lru: LRUCache[Hashable, Any] | None = LRUCache(maxsize) if maxsize > 0 else None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            value = self._lru.get(key) if self._lru is not None else None
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: Hashable, value: Any) -> None:
        if self._lru is None:
            return
        with self._lock:
            self._lru[key] = value

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru) if self._lru is not None else 0

    def clear(self) -> None:
        with self._lock:
            if self._lru is not None:
                self._lru.clear()
