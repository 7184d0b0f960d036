"""Connections to Qdrant: where the collections live (`QdrantLocation`: a server URL with an API key,
or a local-mode folder), and one shared client per location and process (`POOL`), since local mode
locks its folder per client. Local-mode clients are serialised: the service searches from several
threads and local mode is plain Python."""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass
from typing import Any

from qdrant_client import QdrantClient

from clipsearch.manifest import ArtifactError

__all__ = ["POOL", "QdrantLocation"]


@dataclass(frozen=True)
class QdrantLocation:
    """Where the collections live: a server URL (`url`, with an optional API key) or a local-mode
    folder (`path`, or ":memory:")."""

    url: str | None = None
    path: str | None = None
    api_key: str | None = None

    @property
    def local(self) -> bool:
        return self.url is None

    def connect(self) -> QdrantClient:
        try:
            if self.url is not None:
                return QdrantClient(url=self.url, api_key=self.api_key, timeout=30)
            # local mode is plain Python over numpy and SQLite: one call at a time, from any thread
            local = (QdrantClient(location=":memory:") if self.path == ":memory:" else
                     QdrantClient(path=self.path, force_disable_check_same_thread=True))
            return _Serialised(local)  # type: ignore[return-value]
        except RuntimeError as exc:  # local mode: the folder is locked by another process's client
            raise ArtifactError(f"Qdrant local store {self.path} cannot be opened ({exc})") from None

    def describe(self) -> str:
        return self.url or f"local mode at {self.path}"


class _Serialised:
    """A local-mode client whose calls run one at a time (the service searches from several threads)."""

    def __init__(self, client: QdrantClient):
        self._client = client
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)
        return call


class _Pool:
    """One client per location and process, shared by its collections: local mode locks its folder
    per client, so two clients on one folder (two collections, or a reload beside the old resources)
    would fail. Reference-counted; the last release closes the client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[QdrantLocation, tuple[QdrantClient, int]] = {}

    def acquire(self, location: QdrantLocation) -> QdrantClient:
        with self._lock:
            if location.path == ":memory:":  # every in-memory store is its own engine
                return location.connect()
            client, refs = self._clients.get(location, (None, 0))
            if client is None:
                client = location.connect()
            self._clients[location] = (client, refs + 1)
            return client

    def release(self, location: QdrantLocation, client: QdrantClient) -> None:
        with self._lock:
            held = self._clients.get(location)
            if held is None or held[0] is not client:
                client.close()
                return
            if held[1] <= 1:
                del self._clients[location]
                client.close()
            else:
                self._clients[location] = (client, held[1] - 1)

    def close_all(self) -> None:
        with self._lock:
            for client, _ in self._clients.values():
                client.close()
            self._clients.clear()


POOL = _Pool()
# close what is still open while the interpreter can (a client closed from __del__ at shutdown fails)
atexit.register(POOL.close_all)
