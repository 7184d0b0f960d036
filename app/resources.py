"""Everything start-up loads, in one immutable object, and the checks that make it trustworthy.

`load_resources(settings)` opens the served collections (every one under ARTIFACTS_DIR/collections,
or those CLIPSEARCH_COLLECTIONS names) and loads the model the default collection was embedded with,
so the query encoder is always the one that made the vectors. It refuses to serve a mismatched set:
collections of different models, a dimension that differs from the model's, or a checkpoint whose
sha256 differs from the one recorded. Each failure is one `ArtifactError` / `ModelLoadError` whose
message names the problem and the file (relative to ARTIFACTS_DIR), because it becomes /readyz's
reason and a single log line.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from clipsearch.artifacts import ArtifactLayout, check_collection_name
from clipsearch.collection import load_banks
from clipsearch.encoder import Encoder, build_encoder
from clipsearch.hubness import Banks
from clipsearch.index import IndexParams
from clipsearch.manifest import ArtifactError, sha256_json
from clipsearch.models import ModelLoadError, is_local_checkpoint, load_model
from clipsearch.store import FAISS, Catalog, VectorStore, collection_names, open_store

from app.config import Settings

log = logging.getLogger(__name__)

MODEL_KEYS = ("model", "pretrained", "checkpoint_sha256", "embed_dim", "image_tta")
T = TypeVar("T")


class UnknownCollection(LookupError):
    """A request named a collection this service does not serve."""


@dataclass(frozen=True)
class Resources:
    encoder: Encoder
    model: Mapping[str, Any]  # ModelIdentity.to_dict() of the served model (MODEL_KEYS)
    collections: Mapping[str, VectorStore]
    default_collection: str
    image_roots: Mapping[str, Path] = field(default_factory=dict)  # where relative item paths resolve
    images_dir: Path | None = None  # serve files by name from here instead (containers)
    skipped: Mapping[str, str] = field(default_factory=dict)  # collections left out, and why
    artifacts_dir: Path | None = None  # where the media a collection owns (uploads) resolve
    banks: Banks = field(default_factory=Banks)  # the hubness corrections' banks, for new rows' offsets

    @property
    def version(self) -> str:
        """Identifies every served collection's contents now; part of every cache key, so a write or a
        change picked up from another process is never answered from the cache."""
        return sha256_json({name: s.version for name, s in sorted(self.collections.items())})[:16]

    def store(self, name: str | None = None) -> VectorStore:
        store = self.collections.get(name or self.default_collection)
        if store is None:
            raise UnknownCollection(name)
        return store

    def image_file(self, store: VectorStore, image_id: str) -> Path | None:
        item = store.get(image_id)
        if item is None:
            return None
        path = Path(item.path)
        if self.artifacts_dir is not None and not path.is_absolute() and path.parts[:1] == ("collections",):
            return self.artifacts_dir / path  # media the collection owns (uploads), under ARTIFACTS_DIR
        if self.images_dir is not None:
            return self.images_dir / path.name
        if not path.is_absolute():
            path = self.image_roots.get(store.name, Path(".")) / path
        return path

    @property
    def image_count(self) -> int:
        return sum(s.count("images") for s in self.collections.values())

    @property
    def caption_count(self) -> int:
        return sum(s.count("captions") for s in self.collections.values())


def make_resources(encoder: Encoder, stores: Sequence[VectorStore], model: Mapping[str, Any],
                   default: str | None = None, images_dir: Path | None = None,
                   base_dir: Path | None = None, skipped: Mapping[str, str] | None = None,
                   banks: Banks | None = None) -> Resources:
    """Assemble resources from opened stores (start-up, or tests with a fake encoder)."""
    if not stores:
        raise ArtifactError("no collection to serve")
    by_name: dict[str, VectorStore] = {}
    for store in stores:
        if store.name in by_name:
            raise ArtifactError(f"collection {store.name!r} is listed twice")
        if store.dim != encoder.dim:
            raise ArtifactError(f"collection {store.name!r} holds {store.dim}-d vectors but the model "
                                f"{model.get('model')} embeds to {encoder.dim}")
        by_name[store.name] = store
    default = default or stores[0].name
    if default not in by_name:
        raise ArtifactError(f"the default collection {default!r} is not served "
                            f"(served: {', '.join(sorted(by_name))})")
    roots = {name: base_dir for name in by_name} if base_dir is not None else {}
    return Resources(encoder, {k: model.get(k) for k in MODEL_KEYS}, by_name, default, roots, images_dir,
                     dict(skipped or {}), base_dir, banks or Banks())


def refresh_collections(res: Resources) -> list[str]:
    """Let every served collection pick up what other processes committed (an offline ingest into a
    served collection, another replica's writes); the names of those that changed. Cheap when
    nothing did: one read of each catalog's head."""
    changed = []
    for name, store in res.collections.items():
        try:
            if store.refresh():
                changed.append(name)
        except Exception:  # noqa: BLE001 - a collection that cannot refresh keeps serving what it has
            log.warning("collection %s: refresh failed; still serving its last state", name, exc_info=True)
    return changed


def load_resources(settings: Settings) -> Resources:
    # The model the default collection names is read from its catalog first and loaded on a thread
    # while the collections load (the two are as long as each other at 100k items): start-up takes
    # about the longer of the two, not their sum. Whatever the collections then say decides.
    early = _peek_model(settings)
    pending = _background(_load_encoder, early, settings) if early is not None else None
    try:
        stores, skipped, model, default = open_collections(settings)
    except BaseException:
        if pending is not None:
            pending.cancel()
        raise
    try:
        if pending is not None and early == model:
            encoder = pending.result()
        else:
            if pending is not None:
                pending.cancel()
            encoder = _load_encoder(model, settings)
        return make_resources(encoder, list(stores.values()), model, default=default,
                              images_dir=settings.images_dir, base_dir=settings.artifacts_dir, skipped=skipped,
                              banks=load_banks(settings.artifacts_dir, model))
    except BaseException:
        for store in stores.values():  # a failed (re)load must not keep catalogs open
            _close(store)
        raise


def _load_encoder(model: Mapping[str, Any], settings: Settings) -> Encoder:
    pretrained = _resolve_checkpoint(model.get("pretrained"), model.get("checkpoint_sha256"), settings)
    loaded = load_model(model["model"], pretrained, device=settings.device,
                        checkpoint_sha256=model.get("checkpoint_sha256"), image_tta=model.get("image_tta"))
    if not loaded.identity.same_weights(model):
        raise ModelLoadError(f"the loaded model {_describe(loaded.identity.to_dict())} is not the one the "
                             f"collections were embedded with ({_describe(model)})")
    # a lone image query runs on every core (`image_threads`); image batches then run one at a time
    return build_encoder(loaded, text=settings.text_backend, image=settings.image_backend,
                         cache_dir=settings.onnx_cache_dir, threads=settings.torch_threads or 1,
                         image_threads=settings.image_threads)


def _peek_model(settings: Settings) -> dict[str, Any] | None:
    """The model the default FAISS collection names, read from its catalog's meta alone (no rows);
    None where that cannot be told cheaply (another store, no collection, a broken catalog: the full
    open then reports why)."""
    if settings.store != FAISS:
        return None
    try:
        layout = ArtifactLayout(settings.artifacts_dir)
        names = list(settings.collections) or layout.collection_names()
        if not names:
            return None
        with Catalog(layout.collection(settings.default_collection or names[0]).catalog, readonly=True) as cat:
            model = cat.model()
        return _model_of(model) if model is not None else None
    except Exception:  # noqa: BLE001 - only a head start; open_collections reports every failure
        return None


def _background(fn: Callable[..., T], *args: Any) -> Future[T]:
    """`fn(*args)` on a daemon thread of its own; a cancelled future's result is dropped."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name="clipsearch-model-loader", daemon=True).start()
    return future


def open_collections(settings: Settings) -> tuple[dict[str, VectorStore], dict[str, str], dict[str, Any], str]:
    """Open the served collections (writable when CLIPSEARCH_WRITE_TOKEN is set) and check that they
    share one model: (the stores, default first; those skipped and why; the model; the default's name).
    Tests pair it with a fake encoder."""
    root = settings.artifacts_dir
    if not root.is_dir():
        raise ArtifactError(f"ARTIFACTS_DIR {root} does not exist or is not a folder")
    layout = ArtifactLayout(root)
    explicit = list(settings.collections)
    names = explicit or collection_names(layout, settings.store, _api_key(settings))
    if not names:
        if settings.store != FAISS:
            raise ArtifactError(f"no collection in the Qdrant store {settings.store}: copy one there with "
                                f"`python -m offline migrate --collection NAME --to {settings.store}`")
        raise ArtifactError("no collection under ARTIFACTS_DIR/collections: ingest one with "
                            "`python -m offline ingest SOURCE --collection NAME` "
                            "(or `bash scripts/serve.sh --data DIR` / `--media DIR`)")
    for name in names:
        try:
            check_collection_name(name)
        except ValueError as exc:  # Settings validates them; a hand-built Settings may not have
            raise ArtifactError(str(exc)) from None
    default = settings.default_collection or names[0]
    if default not in names:
        raise ArtifactError(f"CLIPSEARCH_DEFAULT_COLLECTION {default!r} is not among the served "
                            f"collections ({', '.join(names)})")
    params = IndexParams("hnsw", settings.hnsw_m, settings.hnsw_ef_construction, settings.hnsw_ef_search)
    stores: dict[str, VectorStore] = {}
    try:
        for name in [default, *[n for n in names if n != default]]:
            stores[name] = _open_collection(layout, name, params, settings)
        model = _model_of(stores[default].model)
        _check_model_fields(model, default)
        skipped: dict[str, str] = {}
        for name, store in list(stores.items()):
            if _model_of(store.model) != model:
                why = (f"collection {name!r} was embedded with {_describe(store.model)}, the default "
                       f"collection {default!r} with {_describe(model)}")
                if explicit:
                    raise ArtifactError(f"{why}; serve collections of one model (CLIPSEARCH_COLLECTIONS)")
                log.warning("%s: not served", why)
                skipped[name] = why
                _close(stores.pop(name))
            elif store.dim != model["embed_dim"]:
                raise ArtifactError(f"collection {name!r} holds {store.dim}-d vectors but names the model "
                                    f"{_describe(model)}; re-ingest it")
        return stores, skipped, model, default
    except BaseException:
        for store in stores.values():  # a failed (re)load must not keep catalogs open
            _close(store)
        raise


def _open_collection(layout: ArtifactLayout, name: str, params: IndexParams, settings: Settings) -> VectorStore:
    """Open one collection and load its rows and index now (not in the first request); every way it
    can fail is one ArtifactError that names the collection."""
    prefix = f"collection {name!r}"
    store: VectorStore | None = None
    writable = settings.writes_enabled
    coll_dir = layout.collection(name).dir
    if writable and coll_dir.is_dir() and not os.access(coll_dir, os.W_OK):
        raise ArtifactError(f"{prefix}: writes are enabled (CLIPSEARCH_WRITE_TOKEN) but its folder "
                            f"{layout.collection(name).dir.relative_to(layout.root)} is not writable; mount "
                            "ARTIFACTS_DIR read-write or unset the token")
    try:
        if settings.store == FAISS:
            store = open_store(layout, name, readonly=not writable, params=params, exact_max=settings.exact_max,
                               verify=settings.verify_index_checksum)
        else:
            store = open_store(layout, name, readonly=not writable, store=settings.store, api_key=_api_key(settings),
                               params=params)
        store.describe()
        return store
    except ArtifactError as exc:
        message = _relative_paths(str(exc), layout.root)
        problem = message if message.startswith(prefix) else f"{prefix}: {message}"
    except (sqlite3.DatabaseError, ValueError) as exc:
        # reads past the catalog's first page (the rows, a vector blob, a metadata or model record)
        # fail as sqlite3/ValueError, not ArtifactError
        rel = layout.collection(name).catalog.relative_to(layout.root)
        problem = f"{prefix}: catalog {rel} cannot be read ({exc}); re-ingest the collection"
    if store is not None:
        _close(store)
    raise ArtifactError(problem)


def _api_key(settings: Settings) -> str | None:
    return settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None


def _close(store: VectorStore) -> None:
    try:
        store.close()
    except Exception:  # noqa: BLE001 - closing a broken catalog must not hide why it broke
        log.debug("closing collection %s failed", store.name, exc_info=True)


def _relative_paths(message: str, root: Path) -> str:
    return message.replace(str(root.resolve()) + "/", "").replace(str(root) + "/", "")


def _model_of(model: Mapping[str, Any]) -> dict[str, Any]:
    return {k: model.get(k) for k in MODEL_KEYS}


def _check_model_fields(model: Mapping[str, Any], name: str) -> None:
    if not isinstance(model.get("model"), str) or not isinstance(model.get("embed_dim"), int):
        raise ArtifactError(f"collection {name!r} does not name a model and its embed_dim; re-ingest it")


def _describe(model: Mapping[str, Any]) -> str:
    pretrained = model.get("pretrained")
    weights = Path(pretrained).name if pretrained and is_local_checkpoint(pretrained) else pretrained
    sha = model.get("checkpoint_sha256")
    return (f"{model.get('model')}/{weights or 'random-init'}"
            f"{'@' + sha[:12] if sha else ''} dim {model.get('embed_dim')}")


def _resolve_checkpoint(pretrained: str | None, sha: str | None, settings: Settings) -> str | None:
    """A local checkpoint at its recorded path, else by file name under ARTIFACTS_DIR/models."""
    if not pretrained or not is_local_checkpoint(pretrained):
        return pretrained
    recorded = Path(pretrained)
    if not sha:
        raise ArtifactError(f"the collection names checkpoint {recorded.name} without its "
                            f"checkpoint_sha256, so the weights cannot be verified; re-ingest it")
    candidates = [recorded] if recorded.is_absolute() else [settings.artifacts_dir / recorded, recorded]
    candidates.append(ArtifactLayout(settings.artifacts_dir).models_dir / recorded.name)
    for path in candidates:
        if path.is_file():
            return str(path)
    raise ModelLoadError(f"checkpoint {recorded.name} is neither at its recorded path {recorded} nor "
                         f"in ARTIFACTS_DIR/models/; copy it there")


def configure_threads(settings: Settings) -> None:
    import faiss
    import torch

    # Each inference worker runs one query at a time; torch and faiss default to every core per call,
    # so N workers would oversubscribe the CPU N-fold and make latency erratic. Cap both explicitly.
    torch.set_num_threads(settings.torch_threads or 1)
    faiss.omp_set_num_threads(settings.torch_threads or 1)
