"""A bound on work in flight, checked without waiting: a full service says so at once (429) instead
of queueing. Searches (`AdmissionMiddleware`) and writes (`app.writes.Writer`) each have one."""

from __future__ import annotations

import threading


class InFlightLimiter:
    def __init__(self, limit: int):
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        return self._count
