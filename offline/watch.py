"""`python -m offline watch DIR --collection NAME`: keep a collection in step with a folder, for as long
as it runs.

    python -m offline watch ~/Pictures --collection photos [--quiet-s 1] [--poll | --poll-interval S]

A first scan ingests whatever changed since the last run; then every change the folder reports
(`watchfiles`: inotify on Linux, the platform's native watcher elsewhere, polling on network mounts,
when asked, or when inotify cannot watch the whole tree) starts another pass of the same incremental
ingest (`offline/ingest.py` with the plan of `clipsearch/collections.py`), so:

* what is new or changed is embedded in batches and committed every few hundred images (a burst of
  10,000 copied files is a few passes at the ingest rate, not 10,000 forwards), and the service sees
  each commit (it polls the catalog's head);
* what moved or was renamed keeps its vectors (0 embedded), what was removed goes in one commit;
* a file still being written is held: it joins a pass only once its size and mtime have been still
  for `--quiet-s` seconds, and a file that fails to decode is tried again `--max-tries` times (it may
  have been read half-written) and then parked as bad until it changes.

Each pass walks the folder (a stat per file), so an event missed by the watcher is caught by the
next pass, and a restart in the middle of a burst loses nothing: the first scan finds the rest.
SIGTERM / SIGINT stop it cleanly (a pass in progress keeps what it committed). The status file
(`clipsearch/watch_status.py`) says what it is doing; `GET /collections` and `/metrics` show it.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.artifacts import ArtifactLayout
from clipsearch.manifest import ArtifactError, now_iso
from clipsearch.store.bad_files import read_bad_files
from clipsearch.watch_status import COUNTERS, write_watch_status
from offline.layouts import DataError

if TYPE_CHECKING:
    from offline.sources import SourceItem

log = logging.getLogger("offline.watch")

# filesystems whose changes made on another machine inotify never sees
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "sshfs", "ceph", "glusterfs",
              "fuse.glusterfs", "davfs", "fuse.davfs2", "afs", "fuse.rclone", "lustre", "gpfs", "beegfs")
HEARTBEAT_S = 10.0
RETRY_S = 5.0  # a file that failed to decode is tried again after RETRY_S × its tries


@dataclass
class WatchOptions:
    quiet_s: float = 1.0  # bench_watch: p50 1.18 s from close to served at 1 s (2.16 s at 2 s)
    force_polling: bool = False
    poll_interval_s: float = 2.0
    max_tries: int = 3
    batch_size: int = 64
    image_backend: str = "auto"
    debounce_ms: int = 500
    heartbeat_s: float = HEARTBEAT_S


@dataclass
class Counters:
    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + int(n)


def choose_mode(root: Path, force_polling: bool, mounts: str = "/proc/mounts",
                max_watches: str = "/proc/sys/fs/inotify/max_user_watches") -> tuple[bool, str]:
    """(polling?, why): polling when asked, on a network filesystem, or when the tree has more
    folders than inotify may watch; the platform's watcher otherwise."""
    if force_polling:
        return True, "asked for (--poll / --poll-interval)"
    fs = _fs_type(root, mounts)
    if fs is not None and (fs in NETWORK_FS or fs.startswith(("nfs", "fuse.s"))):
        return True, f"{root.name or root} is on a {fs} mount, where inotify misses changes made elsewhere"
    try:
        limit = int(Path(max_watches).read_text().strip())
    except (OSError, ValueError):
        return False, "native file events (no inotify limit to check on this platform)"
    folders = sum(1 for _ in _folders(root, limit + 1))
    if folders > limit * 0.9:
        return True, (f"{folders} folders to watch and fs.inotify.max_user_watches is {limit} (raise it with "
                      "sysctl to use inotify)")
    return False, f"inotify ({folders} folders, limit {limit})"


def _fs_type(root: Path, mounts: str) -> str | None:
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    best, fs = "", None
    target = str(root.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fs = point, parts[2]
    return fs


def _folders(root: Path, stop_after: int):
    n = 0
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield dirpath
        n += 1
        if n >= stop_after:
            return


class Watcher:
    """One watched folder feeding one collection. `run()` blocks until `stop` is set (or a signal)."""

    def __init__(self, root: Path, out: Path, collection: str, loaded: Any, options: WatchOptions | None = None,
                 *, ingest_fn: Callable[..., dict[str, Any]] | None = None, params: Any = None):
        from offline.ingest import ingest

        self.root = Path(root).expanduser().resolve()
        self.out = Path(out).resolve()
        self.collection = collection
        self.loaded = loaded
        self.opts = options or WatchOptions()
        self.params = params
        self.layout = ArtifactLayout(self.out)
        self.coll = self.layout.collection(collection)
        self._ingest = ingest_fn or ingest
        self.stop = threading.Event()
        self.events: queue.Queue = queue.Queue()
        self.counters = Counters()
        self.held: dict[str, float] = {}  # path -> when it may settle (monotonic), from the last pass
        self.bad: list[dict[str, Any]] = []
        self.polling, self.mode_reason = False, ""
        self.state = "starting"
        self.last_scan: str | None = None
        self.last_scan_s: float | None = None
        self.last_error: str | None = None
        self.started = now_iso()
        self._in_pass = False
        self._encoder = None
        self._retry_at: float | None = None
        self._fresh = True  # something changed since the last pass (the first pass: everything may have)
        self._restart_polling: str | None = None

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder: `watch` follows a folder of images")
        self.polling, self.mode_reason = choose_mode(self.root, self.opts.force_polling)
        log.info("watch %s → collection %s: %s mode (%s)", self.root.name, self.collection,
                 "polling" if self.polling else "event", self.mode_reason
                 + (f", every {self.opts.poll_interval_s:g} s" if self.polling else ""))
        thread = self._start_watcher()
        self._encoder = self._build_encoder()
        next_beat = 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                due = self._next_due()
                if due is not None and due <= now:
                    self._pass()
                    continue
                if now >= next_beat:
                    self._write_status()
                    next_beat = now + self.opts.heartbeat_s
                wait = min(x for x in (due, next_beat, now + 1.0) if x is not None) - now
                try:
                    got = self.events.get(timeout=max(0.01, wait))
                except queue.Empty:
                    continue
                self._take(got)
                while True:  # drain what else is queued: one pass for the lot
                    try:
                        self._take(self.events.get_nowait())
                    except queue.Empty:
                        break
                if self.stop.is_set():
                    break
                if self._restart_polling is not None:
                    thread = self._restart_watcher(thread)
        except KeyboardInterrupt:
            log.info("watch %s: interrupted during a pass; what it committed is kept", self.collection)
        finally:
            self.stop.set()
            thread.join(timeout=10)
            self.state = "stopped"
            self._write_status()
        return {"collection": self.collection, "mode": "polling" if self.polling else "events",
                "counters": dict(self.counters.values), "bad_files": len(self.bad)}

    @property
    def idle(self) -> bool:
        """Whether the last pass left nothing waiting: no change since, no file held."""
        return self.state == "watching" and not self._fresh and not self.held and self.events.empty()

    def request_stop(self) -> None:
        self.stop.set()

    def _next_due(self) -> float | None:
        """When the next pass should run: now when the folder changed since the last one, else when
        the first held file may have settled or a failed file's retry is due; None: nothing to do."""
        if self._fresh:
            return float("-inf")
        times = list(self.held.values()) + ([self._retry_at] if self._retry_at is not None else [])
        return min(times) if times else None

    def _take(self, got: Any) -> None:
        if isinstance(got, BaseException):
            if not self.polling:
                self._restart_polling = f"the event watcher failed ({type(got).__name__}: {got})"
            else:
                self.last_error = f"the polling watcher failed: {got}"
                log.error("watch %s: %s", self.collection, self.last_error)
                self.stop.set()
            return
        self.counters.add("events", len(got))
        self._fresh = True

    # -- one pass of the incremental ingest ---------------------------------------------------
    def _hold(self, item: SourceItem) -> bool:
        """Whether a file may still be being written: modified within the last quiet_s seconds (every
        write moves the mtime; a rename or move does not, so those are never held)."""
        try:
            since_write = time.time() - os.stat(item.path).st_mtime
        except OSError:
            return False  # gone: the plan lists it as missing
        wait = self.opts.quiet_s - since_write
        if 0 < wait <= self.opts.quiet_s:  # an mtime in the future (another host's clock) is not waited for
            self.held[str(item.path)] = time.monotonic() + wait
            return True
        return False

    def _pass(self) -> None:
        self.state = "scanning"
        self._fresh = False
        self._retry_at = None
        self.held = {}
        first = self.last_scan is None
        self._write_status()
        t0 = time.perf_counter()
        failed_at: float | None = None
        before = self._item_count()
        self._in_pass = True
        try:
            res = self._ingest(self.root, self.out, self.collection, self.loaded, batch_size=self.opts.batch_size,
                               image_backend=self.opts.image_backend, text_backend="torch", params=self.params,
                               hold=self._hold, encoder=self._encoder, max_tries=self.opts.max_tries,
                               snapshot=first)
        except DataError as exc:  # an empty folder, only unreadable files: keep watching
            self.last_error = str(exc).replace(str(self.root), self.root.name)
            log.warning("watch %s: %s", self.collection, self.last_error)
            self.counters.add("errors")
        except ArtifactError as exc:
            self.last_error = str(exc)
            log.error("watch %s: %s", self.collection, exc)
            self.counters.add("errors")
        except Exception as exc:  # noqa: BLE001 - a failed pass (a locked database, a full
            # disk) must not end the watcher: it says why and tries again a little later
            self.last_error = f"{type(exc).__name__}: {exc}".replace(str(self.root), self.root.name)
            log.error("watch %s: pass failed, trying again in %g s", self.collection, 4 * RETRY_S, exc_info=True)
            self.counters.add("errors")
            failed_at = time.monotonic() + 4 * RETRY_S
        except KeyboardInterrupt:  # stopped mid-pass: count the items its commits kept, then stop
            self.counters.add("ingested", max(0, self._item_count() - before))
            raise
        else:
            self.last_error = None
            self.counters.add("ingested", res.get("embedded", 0))
            self.counters.add("relinked", res.get("moved", 0) + res.get("copied", 0))
            self.counters.add("removed", res.get("removed", 0))
            self.counters.add("skipped", res.get("skipped", 0) - res.get("bad_unchanged", 0))
        finally:
            self._in_pass = False
        self.counters.add("cycles")
        self.last_scan, self.last_scan_s = now_iso(), round(time.perf_counter() - t0, 3)
        self._refresh_bad()
        if failed_at is not None:
            self._retry_at = min(failed_at, self._retry_at or failed_at)
        self.state = "watching"
        self._write_status()

    def _item_count(self) -> int:
        """Items in the collection's catalog now (0 before its first commit)."""
        if not self.coll.catalog.is_file():
            return 0
        from clipsearch.store import Catalog

        try:
            with Catalog(self.coll.catalog, readonly=True) as cat:
                return cat.count()[0]
        except ArtifactError:
            return 0

    def _refresh_bad(self) -> None:
        self.bad = []
        if not self.coll.catalog.is_file():
            return
        from clipsearch.store import Catalog

        try:
            with Catalog(self.coll.catalog, readonly=True) as cat:
                bad = read_bad_files(cat)
        except ArtifactError:
            return
        retry = []
        for b in sorted(bad.values(), key=lambda b: b.image_id):
            parked = b.tries >= self.opts.max_tries
            self.bad.append({"path": self._relative(b.path, b.image_id), "tries": b.tries, "parked": parked,
                             "reason": b.reason.replace(str(self.root) + os.sep, "").replace(str(self.root), "."),
                             "since": b.last_tried})
            if not parked:
                retry.append(RETRY_S * b.tries)
        if retry:
            self._retry_at = time.monotonic() + min(retry)

    def _relative(self, path: str, image_id: str) -> str:
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except (ValueError, OSError):
            return image_id

    # -- the watcher thread --------------------------------------------------------------------
    def _filter(self) -> Callable[[Any, str], bool]:
        root, out = str(self.root), str(self.out)

        def keep(_change: Any, path: str) -> bool:
            if path == out or path.startswith(out + os.sep):
                return False  # our own artifacts, when --out lies inside the watched folder
            rel = path[len(root):].lstrip(os.sep)
            return bool(rel) and not any(part.startswith(".") for part in rel.split(os.sep))
        return keep

    def _start_watcher(self) -> threading.Thread:
        import watchfiles

        def target() -> None:
            try:
                for changes in watchfiles.watch(
                        self.root, watch_filter=self._filter(), debounce=self.opts.debounce_ms, step=50,
                        stop_event=self.stop, force_polling=self.polling,
                        poll_delay_ms=int(self.opts.poll_interval_s * 1000), raise_interrupt=False,
                        ignore_permission_denied=True, rust_timeout=5000):
                    self.events.put(changes)
            except Exception as exc:  # noqa: BLE001 - e.g. the inotify limit hit: the loop falls back to polling
                self.events.put(exc)

        thread = threading.Thread(target=target, name="watchfiles", daemon=True)
        thread.start()
        return thread

    def _restart_watcher(self, thread: threading.Thread) -> threading.Thread:
        why, self._restart_polling = self._restart_polling, None
        log.warning("watch %s: %s; polling mode now, every %g s", self.collection, why, self.opts.poll_interval_s)
        self.polling, self.mode_reason = True, why or "the event watcher failed"
        self._fresh = True  # a pass catches what happened while no watcher ran
        return self._start_watcher()

    def _build_encoder(self) -> Any:
        """One encoder for every pass (an ONNX session is built and self-checked once, not per file)."""
        import torch

        from clipsearch.encoder import ClipEncoder, image_backend_for

        backend = image_backend_for(self.loaded, self.opts.image_backend, self.layout.onnx_dir, torch.get_num_threads())
        return ClipEncoder(self.loaded, batch_size=self.opts.batch_size, image_backend=backend)

    # -- status ----------------------------------------------------------------------------
    def _write_status(self) -> None:
        held = len(self.held)
        status = {"collection": self.collection, "folder": self.root.name, "state": self.state,
                  "mode": "polling" if self.polling else "events", "mode_reason": self.mode_reason,
                  "poll_interval_s": self.opts.poll_interval_s if self.polling else None,
                  "quiet_s": self.opts.quiet_s, "pid": os.getpid(), "started": self.started,
                  "heartbeat": now_iso(), "heartbeat_unix": round(time.time(), 3),
                  "heartbeat_every_s": self.opts.heartbeat_s, "last_scan": self.last_scan,
                  "last_scan_seconds": self.last_scan_s, "pending": held,
                  "bad_files": self.bad[:100], "bad_count": len(self.bad), "last_error": self.last_error,
                  "counters": {**self.counters.values, "pending": held}}
        try:
            self.coll.dir.mkdir(parents=True, exist_ok=True)
            write_watch_status(self.coll.watch_status, status)
        except OSError as exc:
            log.warning("watch %s: cannot write %s: %s", self.collection, self.coll.watch_status.name, exc)


# -- the CLI ------------------------------------------------------------------------------------
def add_parser(sub: Any, options: tuple[Callable[[argparse.ArgumentParser], None], ...]) -> None:
    """The `watch` subcommand; `options`: cli's adders of the common, model, backend and index options."""
    add_common, add_model, add_backends, add_index = options
    p = sub.add_parser("watch", help="keep a collection in step with a folder: new, changed, moved and removed "
                                     "photos are ingested as they appear (runs until stopped)")
    add_common(p)
    p.add_argument("source", type=Path, help="the folder of images to watch (recursive)")
    p.add_argument("--collection", default=None, help="collection name (default: the folder's name)")
    p.add_argument("--quiet-s", type=float, default=1.0,
                   help="a file joins a pass once its size and mtime have been still this long (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--poll", action="store_true", help="poll the folder instead of using file events "
                                                         "(network mounts are polled without asking)")
    mode.add_argument("--poll-interval", type=float, default=None, metavar="S",
                      help="poll every S seconds (implies --poll; default when polling: 2)")
    p.add_argument("--max-tries", type=int, default=3,
                   help="decode failures of an unchanged file before it is parked as bad (default: %(default)s)")
    add_model(p)
    p.set_defaults(model=None)
    add_backends(p)
    add_index(p)


def run(args: argparse.Namespace, collection_name: Callable[[argparse.Namespace, Path], str],
        load_model: Callable[[argparse.Namespace], Any]) -> dict[str, Any]:
    """`collection_name` / `load_model`: cli's (the name from --collection or the folder; the model
    from --model or the one the project built)."""
    from clipsearch.index import IndexParams

    if args.quiet_s < 0 or (args.poll_interval is not None and args.poll_interval <= 0) or args.max_tries < 1:
        raise DataError("--quiet-s must be ≥ 0, --poll-interval > 0 and --max-tries ≥ 1")
    source = Path(args.source)
    if not source.is_dir():
        raise DataError(f"{source} is not a folder: `watch` follows a folder of images")
    name = collection_name(args, source)
    loaded = load_model(args)
    opts = WatchOptions(quiet_s=args.quiet_s, force_polling=args.poll or args.poll_interval is not None,
                        poll_interval_s=args.poll_interval or 2.0, max_tries=args.max_tries,
                        batch_size=args.batch_size, image_backend=args.image_backend)
    watcher = Watcher(source, args.out, name, loaded, opts,
                      params=IndexParams("hnsw", args.m, args.ef_construction, args.ef_search))
    install_signals(watcher)
    return watcher.run()


def install_signals(watcher: Watcher) -> None:
    """SIGTERM / SIGINT: stop; during a pass, interrupt it (its commits are kept, the next start resumes)."""
    def on_signal(signum: int, _frame: Any) -> None:
        log.info("watch %s: %s, stopping", watcher.collection, signal.Signals(signum).name)
        watcher.request_stop()
        if watcher._in_pass:
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
