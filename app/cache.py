"""The response cache: a bounded LRU behind a lock that counts its hits and misses.

Keys must say everything that changes an answer: which search, the normalised query text or the
sha256 of the uploaded bytes, k, and the index version (so a redeploy with new indexes never serves
old answers even if the cache were shared).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Hashable
from typing import Any

from cachetools import LRUCache


# Unicode White_Space, the set pydantic's strip_whitespace and JSON Schema's \s agree on. Python's
# str.split() also splits on U+001C..U+001F, which would turn a query of those into "" after
# validation had accepted it; with one explicit set, validation and normalisation cannot disagree.
WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]+")


def normalize_query(text: str) -> str:
    """The form of a query that is both encoded and cached: NFC, whitespace runs collapsed to one
    space, none at either end.

    Case is kept: whether it matters is the tokenizer's business, and the cache must not decide it.
    """
    return _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text)).strip(" ")


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
