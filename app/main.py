"""The app factory: `create_app(settings, resources)` wires routers, middleware and error handlers.

`uvicorn app.main:app` serves the module-level app built from the environment. Nothing heavy happens
at import: the lifespan starts a background thread that loads the model and indexes, so /healthz and
/readyz answer during a slow load, and a failed load leaves the app running un-ready with one log line
saying why (an orchestrator sees 503 on /readyz rather than a crash loop). SIGHUP (and
POST /admin/reload, scope admin) runs the same load again and swaps the new model and indexes in
without downtime; a failed reload keeps the old ones serving. SIGHUP also re-reads the keys file.
Access (app/auth.py, docs/security.md) is decided per router below; a malformed keys file stops
`create_app` with its line number.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from clipsearch import __version__
from clipsearch.manifest import ArtifactError
from clipsearch.models import ModelLoadError

from app import auth
from app.answer_cache import CachedAnswerMiddleware
from app.config import Settings
from app.engine import Engine
from app.errors import install_error_handlers, public_reason
from app.middleware import AdmissionMiddleware, BodyLimitMiddleware, RequestMetricsMiddleware
from app.resources import Resources, configure_threads, load_resources, refresh_collections
from app.routes import admin, collections, embed, media, ops, search, ui, writes

log = logging.getLogger("app")

Loader = Callable[[Settings], Resources]


def load_in_background(state: Engine, loader: Loader) -> threading.Thread | None:
    """Load resources on a thread and swap them in when done. Used at start-up and for reloads; at
    most one runs at a time (returns None if one already is). A failed reload keeps the resources
    being served and records why; a failed first load leaves the app un-ready with the reason."""
    if not state.begin_loading():
        return None

    def target() -> None:
        settings = state.settings
        reloading = state.resources is not None
        try:
            try:
                resources = loader(settings)
            except (ArtifactError, ModelLoadError) as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - any load failure must leave a reason, not a dead thread
                log.debug("resource loading failed", exc_info=True)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = f"unexpected {type(exc).__name__} while loading resources{': ' + first if first else ''}"
            else:
                state.set_ready(resources)
                log.info("%s: %s, %d images / %d captions in %d collection(s) (default %s), version %s",
                         "reloaded" if reloading else "ready", resources.model.get("model"),
                         resources.image_count, resources.caption_count, len(resources.collections),
                         resources.default_collection, resources.version)
                return
            # The log is for operators and keeps paths; clients see the reason without them.
            public = public_reason(reason, settings.artifacts_dir)
            if reloading and state.resources is not None:
                state.set_reload_failed(public)
                log.error("reload failed, still serving index version %s: %s",
                          state.resources.version, reason)
            else:
                state.set_failed(public)
                log.error("not ready (ARTIFACTS_DIR=%s): %s", settings.artifacts_dir, reason)
        finally:
            state.end_loading()

    thread = threading.Thread(target=target, name="clipsearch-loader", daemon=True)
    thread.start()
    return thread


def _install_sighup(state: Engine, loader: Loader, also: Callable[[], None] = lambda: None) -> bool:
    """SIGHUP -> reload in the background (and `also`: re-read the keys file). Only possible on the
    main thread's loop (uvicorn's, not a test client's portal thread) and where the platform has SIGHUP."""
    if not hasattr(signal, "SIGHUP"):
        return False

    def on_sighup() -> None:
        also()
        started = load_in_background(state, loader) is not None
        log.info("SIGHUP: %s", "reloading model and indexes" if started else "a load is already running")

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


async def refresh_loop(state: Engine, interval_s: float) -> None:
    """Every `interval_s`, let the served collections pick up commits made by other processes (an
    offline ingest into a served collection): a cheap read of each catalog's head when there are none."""
    while True:
        await asyncio.sleep(interval_s)
        res = state.resources
        if res is None or state.loading:
            continue
        try:
            changed = await asyncio.to_thread(refresh_collections, res)
        except Exception:  # noqa: BLE001 - the poll must outlive one bad round
            log.warning("refreshing the collections failed", exc_info=True)
            continue
        if changed:
            log.info("picked up new commits in %s; index version %s", ", ".join(changed), res.version)


def _configure_logging() -> None:
    # Under plain `uvicorn app.main:app` nothing configures our logger; give it uvicorn's look. Not
    # propagating keeps a root handler that a library configures later from printing lines twice.
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def create_app(settings: Settings | None = None, resources: Resources | None = None, *,
               loader: Loader | None = None) -> FastAPI:
    """Build the service. With `resources` it is ready at once; otherwise the lifespan loads them
    with `loader` (default `load_resources`) in a background thread."""
    settings = settings or Settings()
    state = Engine(settings, resources)
    load = loader or load_resources

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _configure_logging()
        authenticator.announce()
        configure_threads(settings)
        if state.resources is None:
            load_in_background(state, load)
        sighup = settings.reload_on_sighup and _install_sighup(state, load, authenticator.reload_keys)
        poll = (asyncio.get_running_loop().create_task(refresh_loop(state, settings.refresh_interval_ms / 1000))
                if settings.refresh_interval_ms else None)
        try:
            yield
        finally:
            if poll is not None:
                poll.cancel()
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            state.close()

    # the API docs and schema are served by app.auth's router, behind scope read
    app = FastAPI(title="clipsearch", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  description="CLIP search over image collections: text → images, image → images, "
                              "image → captions, more like this.")
    app.state.service = state  # the engine (`app.deps.EngineDep`)
    authenticator = app.state.auth = auth.Authenticator(settings, state.metrics)  # a bad keys file stops here
    install_error_handlers(app)
    # Every router's scope is decided here, in one place (docs/security.md; tests/app/test_app_auth.py).
    read, deny = [Depends(auth.require("read"))], auth.AUTH_RESPONSES
    app.include_router(search.build_router(settings), dependencies=read, responses=deny)
    app.include_router(embed.build_router(settings), dependencies=read, responses=deny)
    app.include_router(collections.router, dependencies=read, responses=deny)
    app.include_router(media.router, dependencies=read, responses=deny)
    app.include_router(ops.router)  # /healthz, /readyz open (details for scope read); /metrics: metrics_access
    app.include_router(ui.build_router())  # GET /: the search page (app/static/), its sign-in when refused
    app.include_router(auth.build_router(app))  # /auth/login|logout|session; /docs, /openapi.json (read)
    if authenticator.configured:
        app.include_router(admin.build_router(settings, lambda: load_in_background(state, load)),
                           dependencies=[Depends(auth.require("admin"))], responses=deny)
    if state.writes is not None:
        app.include_router(writes.build_router(settings),
                           dependencies=[Depends(auth.require("write"))], responses=deny)
    # Added innermost first: CORS (if any) > request metrics > admission > body caps > raw-body answer
    # cache (repeated text searches, before routing and validation: hits only for scope read) > routes.
    app.add_middleware(CachedAnswerMiddleware, engine=state, allow=auth.cache_gate)
    app.add_middleware(BodyLimitMiddleware, limits=search.body_limits(settings),
                       default=search.DEFAULT_BODY_LIMIT,
                       patterns=writes.body_limit_patterns(settings) if state.writes is not None else ())
    app.add_middleware(AdmissionMiddleware, engine=state, paths=search.SEARCH_PATHS)
    app.add_middleware(RequestMetricsMiddleware, engine=state, static_paths=frozenset(search.SEARCH_PATHS))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PUT", "DELETE"] if state.writes is not None else ["GET", "POST"],
                           allow_headers=["*"])
    return app


app = create_app()
