"""The application factory: load model and gallery (fail fast), wire routers, logs and metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.service.dependencies import (
    add_error_handlers,
    check_read_key,
    client_identity,
    document_match_count,
    presented_key,
)
from app.service.docs import add_local_docs
from app.service.forwarding import ForwardWrites
from app.service.images import configure_pillow
from app.service.inference import InferenceEngine, StartupError
from app.service.logging import configure_logging
from app.service.metrics import ServiceMetrics
from app.service.middleware import AccessMiddleware, Admission, ClientLimit
from app.service.routes import KEY_FORM_ROUTER, OPERATIONS_ROUTER, V1_ROUTERS
from app.service.schemas import ErrorResponse
from app.service.settings import Settings
from app.service.state import ServiceState
from app.service.store import GalleryStore
from app.service.workers import CpuWorkers
from model.hardware import DeviceError, resolve_device
from model.runtime import RuntimeOptions, set_runtime_options

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import Scope

    from index.gallery import Gallery

__all__ = ["create_app"]

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
_service_log = logging.getLogger("gsp.service")
# Multipart framing and the form's text fields, beside the uploads themselves.
_FORM_OVERHEAD_BYTES = 1024 * 1024
# Uploads in the largest request but a gallery add: a region search's image and its two masks.
_UPLOADS_PER_QUERY = 3


def _body_limit(settings: Settings) -> Callable[[Scope], int]:
    """Bytes a request's body may have: a gallery add carries up to ``max_add_images`` uploads,
    any other request at most a region search's three."""
    gallery_add = settings.max_upload_bytes * settings.max_add_images + _FORM_OVERHEAD_BYTES
    query = settings.max_upload_bytes * _UPLOADS_PER_QUERY + _FORM_OVERHEAD_BYTES

    def limit(scope: Scope) -> int:
        path = scope.get("path", "")
        adds = scope.get("method") == "POST" and path.rstrip("/").endswith("/v1/gallery")
        return gallery_add if adds else query

    return limit


def _gallery_info(store: GalleryStore, gallery: Gallery) -> dict[str, str]:
    manifest = gallery.manifest
    return {
        "directory": store.directory.name,  # a name, not a server path
        "model_fingerprint": str(manifest.model_fingerprint),
        "index_type": str(manifest.index_type),
        "embedding_dim": str(manifest.embedding_dim),
    }


def _load(settings: Settings, metrics: ServiceMetrics) -> ServiceState:
    try:
        device = resolve_device(settings.device)
    except DeviceError as error:
        raise StartupError(str(error)) from error
    engine = InferenceEngine(
        settings.checkpoint,
        device,
        max_batch_size=settings.effective_batch_size,
        max_wait_ms=settings.batch_max_wait_ms,
        precision=settings.precision,
        on_batch=metrics.observe_batch,
        graphs=settings.cuda_graphs,
    )
    store = GalleryStore(
        settings.gallery,
        model_fingerprint=engine.fingerprint,
        preprocessing=engine.preprocessing.to_dict(),
        image_roots=settings.image_roots,
        read_only=settings.gallery_read_only,
        save_every=settings.gallery_save_every,
        save_interval=settings.gallery_save_interval_s,
        follow_interval=settings.gallery_follow_interval_s,
    )

    def on_change(gallery: Gallery) -> None:
        """Runs on the gallery thread whenever another gallery is swapped in."""
        metrics.gallery_items.set(len(gallery))
        metrics.gallery_info.info(_gallery_info(store, gallery))

    store.on_change = on_change
    metrics.model_info.info(
        {
            "fingerprint": engine.fingerprint,
            "device": str(engine.device),
            "checkpoint": settings.checkpoint.name,
        }
    )
    store.call(on_change)
    return ServiceState(
        settings=settings,
        engine=engine,
        store=store,
        workers=CpuWorkers(settings.cpu_workers),
        metrics=metrics,
    )


def create_app(settings: Settings, *, leader: Path | None = None) -> FastAPI:
    """Build the service; raises :class:`~app.service.inference.StartupError` when the
    checkpoint or gallery is missing, unreadable or made by a different model.

    ``leader``: this is a follower process (:mod:`app.service.processes`); gallery writes are
    forwarded to the leader's Unix socket at that path.
    """
    configure_logging()
    configure_pillow(settings.max_pixels)
    # Process-wide, and before the model's warm-up compiles anything.
    set_runtime_options(RuntimeOptions(kernel=settings.kernel, compile=settings.compile))
    metrics = ServiceMetrics()
    state = _load(settings, metrics)

    async def reload_on_sighup() -> None:
        try:
            result = await state.store.reload()
        except Exception as error:  # keep serving the old gallery; say why in the log
            _service_log.error("gallery reload on SIGHUP failed: %s", error)
            return
        _service_log.info(
            "gallery reloaded on SIGHUP: %d -> %d items", result.previous_count, result.count
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.batcher.start()
        loop = asyncio.get_running_loop()
        sighup = False
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_on_sighup()))
            sighup = True
        except (ValueError, RuntimeError, NotImplementedError, AttributeError):
            _service_log.info("SIGHUP reload unavailable (not on the main thread)")
        try:
            yield
        finally:
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await state.engine.batcher.stop()
            state.workers.close()
            state.store.close()

    app = FastAPI(
        title="GSP image retrieval",
        version="1",
        description="Search an image gallery with Generalized Sum Pooling embeddings; every "
        "result comes with the pooling-weight heatmaps that explain it.",
        lifespan=lifespan,
        docs_url=None,  # served by add_local_docs, from local files
        redoc_url=None,
    )
    app.state.service = state
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID"],
        )
    if leader is not None:  # inside the admission limits: a forwarded write holds a slot
        app.add_middleware(ForwardWrites, leader=leader, after_write=state.store.refresh)
    app.add_middleware(
        Admission,
        limit=settings.max_in_flight,
        metrics=metrics,
        body_limit=_body_limit(settings),
        body_timeout=settings.body_timeout_s,
    )
    if settings.max_in_flight_per_client:  # outside admission: it counts bodies still arriving
        app.add_middleware(
            ClientLimit,
            limit=settings.max_in_flight_per_client,
            identify=client_identity(settings),
        )
    # Added last, so outermost: the refusals of the limits are logged and counted too.
    app.add_middleware(AccessMiddleware, metrics=metrics)

    add_error_handlers(app)
    # What every /v1 route may answer before it runs; the OpenAPI document says so.
    admission: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": description}
        for status, description in (
            (401, "a read key is needed (GSP_READ_KEYS) and none was given"),
            (403, "the key is not valid"),
            (408, "the body did not arrive in time (GSP_BODY_TIMEOUT_S)"),
            (413, "the body is too large"),
            (429, "this client has too many requests open (GSP_MAX_IN_FLIGHT_PER_CLIENT)"),
            (503, "busy (GSP_MAX_IN_FLIGHT) or stopping; retry"),
        )
    }
    for router in V1_ROUTERS:
        app.include_router(router, responses=admission, dependencies=[Depends(check_read_key)])
    app.include_router(OPERATIONS_ROUTER)
    app.include_router(KEY_FORM_ROUTER)
    document_match_count(app, settings)

    @app.get("/", include_in_schema=False, response_model=None)
    async def index_page(request: Request) -> FileResponse | RedirectResponse:
        if settings.reads_need_key and not settings.grants_read(presented_key(request)):
            return RedirectResponse("key", status_code=303)
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    add_local_docs(app, STATIC_DIR / "favicon.svg")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
