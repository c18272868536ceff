"""What the ``/v1`` routes share: the service state, the error type and its handlers, the key
checks (write keys; optional read keys, also from the page's cookie) and the client identity
of per-client limits, upload reading, the gallery item -> file lookup, and the
settings-derived bound of ``k``.

The routers are module-level, so nothing here is built per application: dependencies read the
settings from the application state, and :func:`document_match_count` writes the configured
bounds of ``k`` into each application's OpenAPI document.

No ``from __future__ import annotations``: FastAPI evaluates the dependencies' annotations.
"""

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
from fastapi import Depends, FastAPI, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyCookie, APIKeyHeader
from pydantic import Field, TypeAdapter, ValidationError
from starlette.requests import HTTPConnection
from starlette.types import Scope

from app.service.batching import BatcherClosed
from app.service.images import DecodedImage, ImageRejected, decode_image
from app.service.schemas import ErrorResponse
from app.service.settings import Settings
from app.service.state import ServiceState, service_state

__all__ = [
    "API_PREFIX",
    "KEY_COOKIE",
    "MAX_ITEM_ID",
    "ApiError",
    "FormMatchCount",
    "ItemFile",
    "ItemId",
    "QueryMatchCount",
    "State",
    "add_error_handlers",
    "check_api_key",
    "check_read_key",
    "check_writable",
    "client_identity",
    "decode_for_network",
    "decode_upload",
    "document_match_count",
    "error_responses",
    "item_file",
    "item_record",
    "read_item_file",
    "read_upload",
]

T = TypeVar("T")
API_PREFIX = "/v1"  # of every route but the probes, metrics and the page
MAX_ITEM_ID = 2**63 - 1
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ITEM_ID, description="gallery item id")]
State = Annotated[ServiceState, Depends(service_state)]
KEY_COOKIE = "gsp_key"  # set by the page's key form (GET /key); grants reads only
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="write access; read access too"
)
_key_cookie = APIKeyCookie(
    name=KEY_COOKIE, auto_error=False, description="read access (set by the key form at /key)"
)


# -- errors --------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as :class:`ErrorResponse` with ``status``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route, so its documented errors appear in the OpenAPI schema."""
    return {status: {"model": ErrorResponse} for status in statuses}


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(detail=detail, code=code).model_dump(), status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    """Answer the service's own errors, rejected images and a stopped model as ErrorResponse."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.code, error.detail)

    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, error: ImageRejected) -> JSONResponse:
        return _error(error.status, error.code, error.message)

    @app.exception_handler(BatcherClosed)
    async def batcher_closed(request: Request, error: BatcherClosed) -> JSONResponse:
        return _error(503, "unavailable", str(error))


# -- write access --------------------------------------------------------------------------------


async def check_api_key(
    state: State, key: Annotated[str | None, Depends(_api_key_header)] = None
) -> None:
    """Write routes need one of the configured keys; with none configured they are closed."""
    keys = state.settings.api_key_values()
    if not keys:
        raise ApiError(403, "writes_disabled", "no API keys are configured; writes are disabled")
    if not key:
        raise ApiError(401, "missing_api_key", "the X-API-Key header is required")
    if not any(hmac.compare_digest(key.encode(), valid.encode()) for valid in keys):
        raise ApiError(403, "bad_api_key", "the API key is not valid")


async def check_read_key(
    state: State,
    key: Annotated[str | None, Depends(_api_key_header)] = None,
    cookie: Annotated[str | None, Depends(_key_cookie)] = None,
) -> None:
    """With read keys configured, search and image routes need one of them or a write key, in
    the header or the page's cookie; without, they are open."""
    settings = state.settings
    if not settings.reads_need_key:
        return
    given = key or cookie
    if not given:
        raise ApiError(
            401,
            "missing_api_key",
            "reading needs a key: the X-API-Key header, or enter it on the page at /key",
        )
    if not settings.grants_read(given):
        raise ApiError(403, "bad_api_key", "the API key is not valid")


def presented_key(connection: HTTPConnection) -> str | None:
    """The key a request carries: the X-API-Key header, else the page's cookie."""
    return connection.headers.get("x-api-key") or connection.cookies.get(KEY_COOKIE) or None


def client_identity(settings: Settings) -> Callable[[Scope], str]:
    """Names a request's client for per-client limits: its key when valid (so that clients
    sharing an address, behind a NAT, count apart), else its address (the proxy's
    X-Forwarded-For when the peer is one of ``trusted_proxies``, resolved by uvicorn)."""

    def identify(scope: Scope) -> str:
        key = presented_key(HTTPConnection(scope))
        if key and settings.grants_read(key):
            return "key " + hashlib.sha256(key.encode()).hexdigest()[:16]
        client = scope.get("client")
        return "address " + (client[0] if client else "unknown")

    return identify


async def check_writable(state: State) -> None:
    """Gallery writes need a gallery opened for writing."""
    if state.store.read_only:
        raise ApiError(409, "read_only", "the gallery is served read-only (gallery_read_only)")


# -- uploads -------------------------------------------------------------------------------------


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """The upload's bytes; reads one byte past the limit so oversized uploads fail early (413)."""
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ImageRejected(
            413,
            "upload_too_large",
            f"upload exceeds the limit of {settings.max_upload_bytes} bytes",
        )
    return data


def decode_upload(data: bytes, content_type: str | None, state: ServiceState) -> DecodedImage:
    """Decode an upload under the service's size and pixel limits; JPEGs at the smallest scale
    that keeps the network's resize size, as the indexer decodes them."""
    return decode_image(
        data,
        content_type=content_type,
        max_bytes=state.settings.max_upload_bytes,
        max_pixels=state.settings.max_pixels,
        min_side=state.engine.min_side,
    )


def decode_for_network(
    data: bytes, content_type: str | None, state: ServiceState
) -> tuple[DecodedImage, torch.Tensor]:
    """An upload decoded and cropped for the network: one image-worker task."""
    decoded = decode_upload(data, content_type, state)
    return decoded, state.engine.prepare(decoded.image)


# -- gallery item -> file ------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemFile:
    record: Any  # index.metadata's record of the item
    path: Path  # its source file, resolved inside the allowed roots


async def item_record(state: ServiceState, item_id: int) -> Any:
    """The item's record; 404 ``unknown_id`` when there is none."""
    record = await state.store.run(lambda gallery: gallery.get(item_id))
    if record is None:
        raise ApiError(404, "unknown_id", f"no gallery item with id {item_id}")
    return record


async def item_file(state: ServiceState, item_id: int) -> ItemFile:
    """The item's record and source file; 404 ``image_unavailable`` when the file is missing
    or lies outside the gallery and ``image_roots``."""
    record = await item_record(state, item_id)
    path = state.store.resolve_source(str(record.source))
    if path is None:
        raise ApiError(404, "image_unavailable", f"the image of item {item_id} is not available")
    return ItemFile(record, path)


async def read_item_file(
    state: ServiceState, item_id: int, read: Callable[[Path], T]
) -> tuple[Any, T]:
    """The item's record and ``read(path)`` of its file on the image workers; a file that is
    unreadable or not a usable image is 404 ``image_unavailable`` too."""
    found = await item_file(state, item_id)
    try:
        return found.record, await state.workers.run(read, found.path)
    except (ImageRejected, OSError) as error:
        raise ApiError(
            404, "image_unavailable", f"the image of item {item_id} is unusable: {error}"
        ) from None


# -- the number of matches -----------------------------------------------------------------------

# Marks the schema of ``k`` for document_match_count; the document never shows it.
_BOUND_BY_SETTINGS = "x-bound-by-settings"


def _match_count(location: str, source: Callable[..., Any]) -> Callable[..., Any]:
    """A dependency reading ``k`` from the query string or the form: at least 1, at most the
    settings' ``max_k`` (FastAPI's 422 validation error beyond), ``default_k`` when absent."""

    async def match_count(
        request: Request,
        state: State,
        k: Annotated[
            int | None,
            source(
                ge=1, description="number of matches", json_schema_extra={_BOUND_BY_SETTINGS: 1}
            ),
        ] = None,
    ) -> int:
        settings = state.settings
        if k is None:
            return settings.default_k
        if k > settings.max_k:  # the error FastAPI gives for a declared le=max_k
            sent = request.query_params if location == "query" else await request.form()
            try:
                TypeAdapter(Annotated[int, Field(le=settings.max_k)]).validate_python(sent.get("k"))
            except ValidationError as error:
                raise RequestValidationError(
                    [
                        {**problem, "loc": (location, "k")}
                        for problem in error.errors(include_url=False)
                    ]
                ) from None
        return k

    return match_count


FormMatchCount = Annotated[int, Depends(_match_count("body", Form))]
QueryMatchCount = Annotated[int, Depends(_match_count("query", Query))]


def document_match_count(app: FastAPI, settings: Settings) -> None:
    """Make ``app``'s OpenAPI document state the settings' bounds of ``k`` (maximum, default,
    description) where the match-count dependencies marked its schema."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        document = generate()
        if fresh:
            _bind_match_count(document, settings)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _bind_match_count(document: dict[str, Any], settings: Settings) -> None:
    bounds = {
        "type": "integer",
        "minimum": 1,
        "maximum": settings.max_k,
        "default": settings.default_k,
        "description": f"number of matches, 1 to {settings.max_k}",
    }

    def bind(node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                bind(value)
            return
        if not isinstance(node, dict):
            return
        if node.pop(_BOUND_BY_SETTINGS, None) is not None:
            node.pop("anyOf", None)  # int | None: the null stands for "the default"
            node.update(bounds)
        elif isinstance(node.get("schema"), dict) and _BOUND_BY_SETTINGS in node["schema"]:
            node["description"] = bounds["description"]  # a query parameter's own copy
        for value in node.values():
            bind(value)

    bind(document)
