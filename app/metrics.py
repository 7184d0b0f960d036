"""Prometheus objects for one app instance, in their own registry.

A per-app `CollectorRegistry` (not the process-global one) lets several apps live in one process,
as they do in the tests. Stage histograms (decode, encode, search, total) let a slow request explain
itself; cache and index gauges say what the service is serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, \
    generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from clipsearch.models import is_local_checkpoint

# endpoint -> its stages; children are created up front so dashboards see zeros, not gaps
STAGES = {"text": ("encode", "search", "total"), "image": ("decode", "encode", "search", "total"),
          "similar": ("search", "total"), "vector": ("search", "total"),
          "terms": ("decode", "encode", "search", "total"), "embed_text": ("encode", "total"),
          "embed_image": ("decode", "encode", "total")}
# 0.5 ms .. 10 s: a cache hit is sub-millisecond, a big image on a busy CPU can take seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


WRITE_RESULTS = {"upload": ("created", "existing", "updated", "invalid", "rejected", "error"),
                 "delete": ("deleted", "not_found", "rejected", "error"),
                 "captions": ("replaced", "not_found", "invalid", "rejected", "error")}
COMPACTION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class _StoreCollector(Collector):
    """Collection sizes, tombstones pending, rows past the HNSW graph and changes replayed at start-up,
    read from each served store's optional `stats()` when /metrics is scraped."""

    def __init__(self, source: Callable[[], Callable[[], Any] | None]):
        self._source = source

    def describe(self) -> list:
        return []  # computed at collect time; nothing to declare up front

    def collect(self) -> Iterator[GaugeMetricFamily]:
        get = self._source()
        res = get() if get is not None else None
        size = GaugeMetricFamily("clipsearch_collection_rows", "Live rows per collection and target",
                                 labels=["collection", "target"])
        dead = GaugeMetricFamily("clipsearch_tombstones_pending", "Deleted or replaced rows still in the "
                                 "search structures (filtered at search) until the next compaction",
                                 labels=["collection", "target"])
        delta = GaugeMetricFamily("clipsearch_delta_rows", "Rows added after the HNSW graph was built, "
                                  "searched exactly until the next compaction", labels=["collection", "target"])
        replayed = GaugeMetricFamily("clipsearch_replayed_changes", "Changes after the index snapshot "
                                     "replayed when the collection was loaded", labels=["collection"])
        for name, store in sorted((res.collections if res is not None else {}).items()):
            info = store.stats()
            if info is None:
                for target in ("images", "captions"):
                    size.add_metric([name, target], store.count(target))
                continue
            for target in ("images", "captions"):
                size.add_metric([name, target], info[target]["live"])
                dead.add_metric([name, target], info[target]["tombstones"])
                delta.add_metric([name, target], info[target]["delta"])
            replayed.add_metric([name], info.get("replayed_at_start", 0))
        yield from (size, dead, delta, replayed)


class _WatchCollector(Collector):
    """What each served collection's folder watcher (`offline watch`) counts, read from its status file
    (`clipsearch/watch_status.py`) when /metrics is scraped; nothing for a collection none watches."""

    def __init__(self, source: Callable[[], Callable[[], Any] | None]):
        self._source = source

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        from clipsearch.watch_status import read_watch_status

        get = self._source()
        res = get() if get is not None else None
        counters = {k: CounterMetricFamily(f"clipsearch_watch_{k}", help_, labels=["collection"])
                    for k, help_ in WATCH_COUNTERS.items()}
        pending = GaugeMetricFamily("clipsearch_watch_pending", "Files the watcher holds until they stop changing",
                                    labels=["collection"])
        bad = GaugeMetricFamily("clipsearch_watch_bad_files", "Files that failed to decode (parked or to retry)",
                                labels=["collection"])
        for name, store in sorted(getattr(res, "collections", {}).items()):
            layout = getattr(store, "layout", None)
            status = read_watch_status(layout.watch_status) if layout is not None else None
            if status is None:
                continue
            values = status.get("counters") or {}
            for k, family in counters.items():
                family.add_metric([name], float(values.get(k, 0)))
            pending.add_metric([name], float(status.get("pending", 0)))
            bad.add_metric([name], float(status.get("bad_count", 0)))
        yield from (*counters.values(), pending, bad)


WATCH_COUNTERS = {"events": "File events the watcher received", "ingested": "Images the watcher embedded",
                  "relinked": "Moved, renamed or copied files re-linked to known vectors (not embedded)",
                  "removed": "Items removed because their file went", "skipped": "Files a pass could not ingest",
                  "cycles": "Ingest passes the watcher ran"}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("clipsearch_http_requests", "HTTP requests by route template, method "
                                "and status", ["route", "method", "status"], registry=r)
        self.stage_seconds = Histogram("clipsearch_stage_seconds", "Time per request stage",
                                       ["endpoint", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("clipsearch_cache_hits", "Response cache hits", ["endpoint"], registry=r)
        self.cache_misses = Counter("clipsearch_cache_misses", "Response cache misses", ["endpoint"],
                                    registry=r)
        self.cache_entries = Gauge("clipsearch_cache_entries", "Entries in the response cache", registry=r)
        self.rejected = Counter("clipsearch_rejected_requests", "Search requests turned away with 429 "
                                "because max_in_flight were running", ["endpoint"], registry=r)
        self.in_flight = Gauge("clipsearch_in_flight_requests", "Search requests being served", registry=r)
        self.index_size = Gauge("clipsearch_index_size", "Vectors in each served index", ["index"],
                                registry=r)
        self.ready = Gauge("clipsearch_ready", "1 once model and indexes are loaded", registry=r)
        self.model = Info("clipsearch_model", "The served model and index version", registry=r)
        # live writes (app/writes.py); the per-collection gauges are read from the stores at scrape time
        self.writes = Counter("clipsearch_writes", "Write requests by operation and result", ["op", "result"],
                              registry=r)
        self.compactions = Counter("clipsearch_compactions", "Compactions run", ["collection"], registry=r)
        self.compaction_seconds = Histogram("clipsearch_compaction_seconds", "Time per compaction",
                                            ["collection"], buckets=COMPACTION_BUCKETS, registry=r)
        # access control (app/auth.py): key *names* and scopes only, never a key
        self.key_requests = Counter("clipsearch_key_requests", "Authorised requests by key name and scope "
                                    "(loopback / anonymous without keys)", ["key", "scope"], registry=r)
        self.auth_failures = Counter("clipsearch_auth_failures", "Requests refused by access control, by "
                                     "reason", ["reason"], registry=r)
        self.store_source: Callable[[], Any] | None = None  # -> the served Resources, or None
        r.register(_StoreCollector(lambda: self.store_source))
        r.register(_WatchCollector(lambda: self.store_source))
        for op, results in WRITE_RESULTS.items():
            for result in results:
                self.writes.labels(op, result)
        for endpoint, stages in STAGES.items():
            for stage in stages:
                self.stage_seconds.labels(endpoint, stage)
            self.cache_hits.labels(endpoint)
            self.cache_misses.labels(endpoint)
            self.rejected.labels(endpoint)

    def observe_stages(self, endpoint: str, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(endpoint, stage).observe(value)

    def set_served(self, image_count: int, caption_count: int, model: dict[str, Any], version: str,
                   default_collection: str) -> None:
        self.index_size.labels("images").set(image_count)
        self.index_size.labels("texts").set(caption_count)
        pretrained = model.get("pretrained") or "none"
        if is_local_checkpoint(pretrained):
            pretrained = Path(pretrained).name  # the file, not where this host keeps it
        self.model.info({"model": str(model.get("model")), "pretrained": str(pretrained),
                         "embed_dim": str(model.get("embed_dim")), "index_version": version,
                         "default_collection": default_collection})
        self.ready.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
