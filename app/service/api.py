"""The ``/v1`` routes: search, gallery items and files, gallery writes, admin reload.

Routes are built per application so that bounds such as ``max_k`` come from its settings and
appear in the OpenAPI document (hence no ``from __future__ import annotations`` here: FastAPI
must evaluate the route annotations, which refer to local values).
"""

import asyncio
import hmac
import json
import mimetypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.security import APIKeyHeader
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.service.images import DecodedImage, ImageRejected, decode_image, thumbnail
from app.service.rendering import (
    centre_crop,
    heatmap_model,
    inline_heatmap,
    overlay_png,
    thumbnail_jpeg,
)
from app.service.schemas import (
    AddedItem,
    AddResponse,
    DeleteResponse,
    ErrorResponse,
    ItemResponse,
    Match,
    QueryInfo,
    ReloadResponse,
    SearchResponse,
    Timings,
)
from app.service.settings import Settings
from app.service.state import ServiceState, service_state

__all__ = [
    "ApiError",
    "SearchQuery",
    "State",
    "build_matches",
    "build_router",
    "check_api_key",
    "decode_upload",
    "error_responses",
    "item_urls",
    "network_square",
    "read_upload",
    "record_stage",
    "search_gallery",
    "upload_search_response",
]

MAX_ITEM_ID = 2**63 - 1
ItemId = Annotated[int, Path(ge=0, le=MAX_ITEM_ID, description="gallery item id")]
State = Annotated[ServiceState, Depends(service_state)]
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="write access")


@dataclass(frozen=True)
class SearchQuery:
    """What a search asked for, and when its request began (for the total time)."""

    k: int
    label: str | None
    heatmaps: bool
    begun: float


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


async def check_writable(state: State) -> None:
    """Gallery writes need a gallery opened for writing."""
    if state.store.read_only:
        raise ApiError(409, "read_only", "the gallery is served read-only (gallery_read_only)")


def record_stage(request: Request, name: str, started: float) -> float:
    """Record a stage duration (ms) for the access log and metrics; returns it."""
    elapsed = (time.perf_counter() - started) * 1000.0
    request.state.stages[name] = elapsed
    return elapsed


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


def item_urls(request: Request, item_id: int) -> dict[str, str]:
    """Image and thumbnail URLs of an item, honouring a proxy's ``root_path``."""
    base = f"{request.scope.get('root_path', '')}/v1/gallery/{item_id}"
    return {"image_url": f"{base}/image", "thumbnail_url": f"{base}/thumbnail"}


def _heatmap_url(request: Request, item_id: int) -> str:
    return f"{request.scope.get('root_path', '')}/v1/gallery/{item_id}/heatmap"


def search_gallery(
    embedding: np.ndarray, k: int, label: str | None, exclude: int | None
) -> Callable[[Any], list[tuple[Any, Any]]]:
    """A gallery-thread function that searches and fetches the records: (match, record) pairs."""

    def work(gallery: Any) -> list[tuple[Any, Any]]:
        wanted = k + (1 if exclude is not None else 0)
        found = gallery.search(embedding[None, :].astype(np.float32), wanted, label=label)[0]
        found = [match for match in found if match.id != exclude][:k]
        records = gallery.get_many([match.id for match in found])
        by_id = {record.id: record for record in records if record is not None}
        return [(match, by_id[match.id]) for match in found if match.id in by_id]

    return work


def build_matches(request: Request, pairs: list[tuple[Any, Any]], heatmaps: bool) -> list[Match]:
    """The response models of :func:`search_gallery`'s (match, record) pairs, ranked from 1."""
    matches = []
    for rank, (match, record) in enumerate(pairs, start=1):
        heatmap = None
        if heatmaps and record.weights is not None:
            heatmap = heatmap_model(record.weights, _heatmap_url(request, record.id))
        matches.append(
            Match(
                id=int(record.id),
                rank=rank,
                score=float(match.score),
                label=record.label,
                source=str(record.source),
                metadata=dict(record.extra or {}),
                heatmap=heatmap,
                **item_urls(request, int(record.id)),
            )
        )
    return matches


def network_square(state: ServiceState, image: Image.Image) -> Image.Image:
    """A thumbnail of the centred square the network saw, to draw heatmaps over."""
    return centre_crop(thumbnail(image, state.settings.thumbnail_size), state.engine.crop_fraction)


async def upload_search_response(
    request: Request,
    state: ServiceState,
    decoded: DecodedImage,
    weights: np.ndarray,
    pairs: list[tuple[Any, Any]],
    query: SearchQuery,
    stage_ms: tuple[float, float, float],
) -> SearchResponse:
    """The response of a search by uploaded image; ``stage_ms``: decode, embed, search."""
    heatmap = None
    if query.heatmaps:
        heatmap = await state.workers.run(
            lambda: inline_heatmap(network_square(state, decoded.image), weights)
        )
    width, height = decoded.size
    decode_ms, embed_ms, search_ms = stage_ms
    return SearchResponse(
        model_fingerprint=state.engine.fingerprint,
        crop_fraction=state.engine.crop_fraction,
        k=query.k,
        label=query.label,
        query=QueryInfo(
            width=width,
            height=height,
            format=decoded.format,
            frames=decoded.frames,
            heatmap=heatmap,
        ),
        matches=build_matches(request, pairs, query.heatmaps),
        timings=Timings(
            decode_ms=decode_ms,
            embed_ms=embed_ms,
            search_ms=search_ms,
            total_ms=(time.perf_counter() - query.begun) * 1000.0,
        ),
    )


def build_router(settings: Settings) -> APIRouter:
    """All ``/v1`` routes, with bounds taken from ``settings``."""
    router = APIRouter(prefix="/v1")
    k_description = f"number of matches, 1 to {settings.max_k}"

    async def run_search(
        request: Request,
        state: ServiceState,
        embedding: np.ndarray,
        k: int,
        label: str | None,
        exclude: int | None,
    ) -> tuple[list[Any], float]:
        started = time.perf_counter()
        pairs = await state.store.run(search_gallery(embedding, k, label, exclude))
        return pairs, record_stage(request, "search", started)

    @router.post(
        "/search",
        response_model=SearchResponse,
        responses=error_responses(400, 413, 415, 503),
        summary="Search the gallery with an uploaded image",
        tags=["search"],
    )
    async def search(
        request: Request,
        state: State,
        image: Annotated[UploadFile, File(description="query image (any Pillow format)")],
        k: Annotated[int, Form(ge=1, le=settings.max_k, description=k_description)] = (
            settings.default_k
        ),
        label: Annotated[str | None, Form(description="only return items with this label")] = None,
        heatmaps: Annotated[bool, Form(description="include heatmaps")] = True,
    ) -> SearchResponse:
        begun = time.perf_counter()
        started = time.perf_counter()
        data = await read_upload(image, settings)

        def decode_and_prepare() -> tuple[DecodedImage, Any]:
            decoded = decode_upload(data, image.content_type, state)
            return decoded, state.engine.prepare(decoded.image)

        decoded, tensor = await state.workers.run(decode_and_prepare)
        decode_ms = record_stage(request, "decode", started)
        started = time.perf_counter()
        embedded = await state.engine.embed(tensor)
        embed_ms = record_stage(request, "embed", started)
        pairs, search_ms = await run_search(request, state, embedded.embedding, k, label, None)
        return await upload_search_response(
            request,
            state,
            decoded,
            embedded.weights,
            pairs,
            SearchQuery(k, label, heatmaps, begun),
            (decode_ms, embed_ms, search_ms),
        )

    @router.post(
        "/search/by-id/{item_id}",
        response_model=SearchResponse,
        responses=error_responses(404),
        summary="Search with the stored embedding of a gallery item (the item itself excluded)",
        tags=["search"],
    )
    async def search_by_id(
        request: Request,
        state: State,
        item_id: ItemId,
        k: Annotated[int, Query(ge=1, le=settings.max_k, description=k_description)] = (
            settings.default_k
        ),
        label: Annotated[str | None, Query(description="only items with this label")] = None,
        heatmaps: Annotated[bool, Query(description="include heatmaps")] = True,
    ) -> SearchResponse:
        begun = time.perf_counter()
        started = time.perf_counter()
        found = await state.store.run(lambda g: (g.embedding(item_id), g.get(item_id)))
        embedding, record = found
        if embedding is None or record is None:
            raise ApiError(404, "unknown_id", f"no gallery item with id {item_id}")
        decode_ms = record_stage(request, "decode", started)
        pairs, search_ms = await run_search(
            request, state, np.asarray(embedding), k, label, item_id
        )
        weights = np.asarray(record.weights)
        return SearchResponse(
            model_fingerprint=state.engine.fingerprint,
            crop_fraction=state.engine.crop_fraction,
            k=k,
            label=label,
            query=QueryInfo(
                width=int(weights.shape[1]),
                height=int(weights.shape[0]),
                format=None,
                frames=1,
                id=item_id,
                heatmap=heatmap_model(weights, _heatmap_url(request, item_id))
                if heatmaps
                else None,
            ),
            matches=build_matches(request, pairs, heatmaps),
            timings=Timings(
                decode_ms=decode_ms,
                embed_ms=0.0,
                search_ms=search_ms,
                total_ms=(time.perf_counter() - begun) * 1000.0,
            ),
        )

    async def record_or_404(state: ServiceState, item_id: int) -> Any:
        record = await state.store.run(lambda g: g.get(item_id))
        if record is None:
            raise ApiError(404, "unknown_id", f"no gallery item with id {item_id}")
        return record

    async def file_or_404(state: ServiceState, item_id: int) -> tuple[Any, Any]:
        record = await record_or_404(state, item_id)
        path = state.store.resolve_source(str(record.source))
        if path is None:
            raise ApiError(
                404, "image_unavailable", f"the image of item {item_id} is not available"
            )
        return record, path

    @router.get(
        "/gallery/{item_id}",
        response_model=ItemResponse,
        responses=error_responses(404),
        summary="Metadata of one gallery item",
        tags=["gallery"],
    )
    async def get_item(request: Request, state: State, item_id: ItemId) -> ItemResponse:
        record = await record_or_404(state, item_id)
        return ItemResponse(
            id=int(record.id),
            source=str(record.source),
            sha256=record.sha256,
            label=record.label,
            added_at=record.added_at,
            metadata=dict(record.extra or {}),
            heatmap=heatmap_model(record.weights, _heatmap_url(request, item_id)),
            **item_urls(request, item_id),
        )

    image_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"image/*": {}}, "description": "the image"},
        **error_responses(404),
    }

    @router.get(
        "/gallery/{item_id}/image",
        response_class=FileResponse,
        responses=image_responses,
        summary="The original image file of a gallery item",
        tags=["gallery"],
    )
    async def get_item_image(state: State, item_id: ItemId) -> FileResponse:
        _, path = await file_or_404(state, item_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(
            path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"}
        )

    async def thumbnail_bytes(state: ServiceState, item_id: int) -> tuple[Any, bytes]:
        record, path = await file_or_404(state, item_id)
        try:
            jpeg = await state.workers.run(
                thumbnail_jpeg, path, settings.thumbnail_size, settings.max_pixels
            )
        except ImageRejected as error:
            raise ApiError(
                404, "image_unavailable", f"the image of item {item_id} is unusable: {error}"
            ) from None
        return record, jpeg

    @router.get(
        "/gallery/{item_id}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **error_responses(404)},
        summary="A JPEG thumbnail of a gallery item",
        tags=["gallery"],
    )
    async def get_item_thumbnail(state: State, item_id: ItemId) -> Response:
        _, jpeg = await thumbnail_bytes(state, item_id)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    @router.get(
        "/gallery/{item_id}/heatmap",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **error_responses(404)},
        summary="The item's heatmap drawn over its thumbnail, as PNG",
        tags=["gallery"],
    )
    async def get_item_heatmap(
        state: State,
        item_id: ItemId,
        opacity: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
    ) -> Response:
        record, jpeg = await thumbnail_bytes(state, item_id)

        def render() -> bytes:
            import io

            with Image.open(io.BytesIO(jpeg)) as small:
                square = centre_crop(small.convert("RGB"), state.engine.crop_fraction)
                return overlay_png(square, np.asarray(record.weights), opacity)

        return Response(await state.workers.run(render), media_type="image/png")

    @router.post(
        "/gallery",
        response_model=AddResponse,
        responses=error_responses(400, 401, 403, 409, 413, 415, 503),
        dependencies=[Depends(check_api_key), Depends(check_writable)],
        summary="Add images (with labels and metadata) to the gallery",
        tags=["gallery"],
    )
    async def add_items(
        state: State,
        images: Annotated[list[UploadFile], File(description="one or more images")],
        labels: Annotated[
            list[str] | None,
            Form(description="one label for all images, or one per image, in order"),
        ] = None,
        metadata: Annotated[
            str | None,
            Form(description="JSON object for all images, or a JSON list with one per image"),
        ] = None,
    ) -> AddResponse:
        count = len(images)
        if count > settings.max_add_images:
            raise ApiError(
                413,
                "too_many_images",
                f"{count} images sent; at most {settings.max_add_images} per request",
            )
        per_image_labels = _spread(labels or [], count, "labels")
        per_image_extra = _parse_metadata(metadata, count)
        blobs = [await read_upload(upload, settings) for upload in images]

        def decode_all() -> list[tuple[DecodedImage, Any]]:
            decoded = []
            for index, (upload, data) in enumerate(zip(images, blobs, strict=True)):
                try:
                    one = decode_upload(data, upload.content_type, state)
                except ImageRejected as error:
                    raise ImageRejected(
                        error.status, error.code, f"image {index}: {error.message}"
                    ) from None
                decoded.append((one, state.engine.prepare(one.image)))
            return decoded

        decoded = await state.workers.run(decode_all)
        embedded = await asyncio.gather(*(state.engine.embed(tensor) for _, tensor in decoded))
        known = await state.store.run(
            lambda g: {one.sha256 for one, _ in decoded if g.find_sha256(one.sha256) is not None}
        )
        sources = []
        for data, (one, _) in zip(blobs, decoded, strict=True):
            if one.sha256 in known:  # a duplicate keeps its stored source; write no file
                sources.append("")
            else:
                sources.append(
                    await run_in_threadpool(
                        state.store.store_upload, data, one.sha256, _extension(one.format)
                    )
                )

        def add(gallery: Any) -> tuple[Any, list[Any], int]:
            from index.gallery import ItemInput

            items = [
                ItemInput(source=source, sha256=one.sha256, label=label, extra=extra)
                for source, (one, _), label, extra in zip(
                    sources, decoded, per_image_labels, per_image_extra, strict=True
                )
            ]
            result = gallery.add(
                np.stack([e.embedding for e in embedded]).astype(np.float32),
                [e.weights for e in embedded],
                items,
            )
            gallery.save()
            return result, gallery.get_many(result.ids), len(gallery)

        result, records, size = await state.store.run(add)
        state.metrics.gallery_items.set(size)
        duplicates = set(result.duplicates)  # input positions already in the gallery
        return AddResponse(
            items=[
                AddedItem(
                    id=int(record.id),
                    sha256=record.sha256,
                    label=record.label,
                    source=str(record.source),
                    duplicate=position in duplicates,
                )
                for position, record in enumerate(records)
            ],
            gallery_size=size,
        )

    @router.delete(
        "/gallery/{item_id}",
        response_model=DeleteResponse,
        responses=error_responses(401, 403, 404, 409),
        dependencies=[Depends(check_api_key), Depends(check_writable)],
        summary="Remove an item from the gallery",
        tags=["gallery"],
    )
    async def delete_item(state: State, item_id: ItemId) -> DeleteResponse:
        def remove(gallery: Any) -> tuple[int, int, str | None]:
            record = gallery.get(item_id)
            removed = gallery.remove([item_id])
            if removed:
                gallery.save()
            orphan = None
            if record is not None and gallery.find_sha256(record.sha256) is None:
                orphan = str(record.source)
            return removed, len(gallery), orphan

        removed, size, orphan = await state.store.run(remove)
        if not removed:
            raise ApiError(404, "unknown_id", f"no gallery item with id {item_id}")
        if orphan is not None:
            state.store.discard_upload(orphan)
        state.metrics.gallery_items.set(size)
        return DeleteResponse(id=item_id, deleted=True, gallery_size=size)

    @router.post(
        "/admin/reload-gallery",
        response_model=ReloadResponse,
        responses=error_responses(401, 403, 409),
        dependencies=[Depends(check_api_key)],
        summary="Re-open the gallery directory (rebuilt offline) and swap it in atomically",
        tags=["admin"],
    )
    async def reload_gallery(state: State) -> ReloadResponse:
        from app.service.inference import StartupError

        try:
            result = await state.store.reload()
        except StartupError as error:
            raise ApiError(
                409, "reload_failed", f"{error}; still serving the previous gallery"
            ) from None
        return ReloadResponse(
            previous_size=result.previous_count,
            gallery_size=result.count,
            model_fingerprint=state.engine.fingerprint,
        )

    return router


def _spread(values: list[str], count: int, name: str) -> list[str | None]:
    if not values:
        return [None] * count
    if len(values) == 1:
        return [values[0]] * count
    if len(values) != count:
        raise ApiError(400, f"bad_{name}", f"{len(values)} {name} for {count} images")
    return list(values)


def _parse_metadata(text: str | None, count: int) -> list[dict[str, Any] | None]:
    if text is None or text == "":
        return [None] * count
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, "bad_metadata", f"metadata is not valid JSON: {error}") from None
    if isinstance(value, dict):
        return [value] * count
    if isinstance(value, list) and len(value) == count and all(isinstance(v, dict) for v in value):
        return list(value)
    raise ApiError(
        400, "bad_metadata", f"metadata must be a JSON object or a list of {count} objects"
    )


def _extension(image_format: str) -> str:
    name = image_format.lower()
    name = {"jpeg": "jpg", "mpo": "jpg"}.get(name, name)
    return name if name.isalnum() and name.isascii() else "img"
