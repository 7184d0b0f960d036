"""The app factory: `create_app(settings, resources)` wires routers, middleware and error handlers.

`uvicorn app.main:app` serves the module-level app built from the environment. Nothing heavy happens
at import: the lifespan starts a background thread that loads the model and indexes, so /healthz and
/readyz answer during a slow load, and a failed load leaves the app running un-ready with one log line
saying why (an orchestrator sees 503 on /readyz rather than a crash loop).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from clipsearch import __version__
from clipsearch.manifest import ArtifactError
from clipsearch.models import ModelLoadError

from app.config import Settings
from app.errors import install_error_handlers
from app.middleware import AdmissionMiddleware, BodyLimitMiddleware, RequestMetricsMiddleware
from app.resources import Resources, configure_threads, load_resources
from app.routes import ops, search
from app.state import ServiceState

log = logging.getLogger("app")

Loader = Callable[[Settings], Resources]


def load_in_background(state: ServiceState, loader: Loader) -> threading.Thread:
    def target() -> None:
        settings = state.settings
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
            log.info("ready: %s, %d images / %d captions of split '%s', index version %s",
                     resources.model.get("model"), resources.image_index.ntotal,
                     resources.text_index.ntotal, resources.split, resources.version)
            return
        state.set_failed(reason)
        log.error("not ready (ARTIFACTS_DIR=%s, split '%s'): %s", settings.artifacts_dir,
                  settings.serve_split, reason)

    thread = threading.Thread(target=target, name="clipsearch-loader", daemon=True)
    thread.start()
    return thread


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
    state = ServiceState(settings, resources)
    load = loader or load_resources

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _configure_logging()
        configure_threads(settings)
        if state.resources is None:
            load_in_background(state, load)
        try:
            yield
        finally:
            state.close_pool()

    app = FastAPI(title="clipsearch", version=__version__, lifespan=lifespan,
                  description="CLIP text-to-image and image-to-text search over an indexed split.")
    app.state.service = state
    install_error_handlers(app)
    app.include_router(search.build_router(settings))
    app.include_router(ops.router)
    # Added innermost first: CORS (if any) > request metrics > admission > body caps > routes.
    app.add_middleware(BodyLimitMiddleware, limits=search.body_limits(settings),
                       default=search.DEFAULT_BODY_LIMIT)
    app.add_middleware(AdmissionMiddleware, state=state, paths=search.SEARCH_PATHS)
    app.add_middleware(RequestMetricsMiddleware, state=state, static_paths=frozenset(search.SEARCH_PATHS))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    return app


app = create_app()
