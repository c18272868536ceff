"""Gallery items: metadata, original file, thumbnail and heatmap; adding and removing items.

No ``from __future__ import annotations``: FastAPI evaluates the route annotations.
"""

import asyncio
import io
import json
import mimetypes
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.service.dependencies import (
    API_PREFIX,
    ApiError,
    ItemId,
    State,
    check_api_key,
    check_writable,
    decode_for_network,
    error_responses,
    item_file,
    item_record,
    read_item_file,
    read_upload,
)
from app.service.images import DecodedImage, ImageRejected
from app.service.rendering import centre_crop, heatmap_model, overlay_png, thumbnail_jpeg
from app.service.schemas import AddedItem, AddResponse, DeleteResponse, ItemResponse
from app.service.searching import heatmap_url, item_urls
from app.service.state import ServiceState
from index.errors import InvalidItemError
from index.limits import (
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    check_label,
    check_metadata,
    nests_deeper,
)

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["gallery"])


@router.get(
    "/gallery/{item_id}",
    response_model=ItemResponse,
    responses=error_responses(404),
    summary="Metadata of one gallery item",
)
async def get_item(request: Request, state: State, item_id: ItemId) -> ItemResponse:
    record = await item_record(state, item_id)
    return ItemResponse(
        id=int(record.id),
        source=state.store.public_source(str(record.source)),
        sha256=record.sha256,
        label=record.label,
        added_at=record.added_at,
        metadata=dict(record.extra or {}),
        heatmap=heatmap_model(record.weights, heatmap_url(request, item_id)),
        **item_urls(request, item_id),
    )


@router.get(
    "/gallery/{item_id}/image",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/*": {}}, "description": "the image"},
        **error_responses(404),
    },
    summary="The original image file of a gallery item",
)
async def get_item_image(state: State, item_id: ItemId) -> FileResponse:
    path = (await item_file(state, item_id)).path
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})


async def _thumbnail(state: ServiceState, item_id: int) -> tuple[Any, bytes]:
    """The item's record and a JPEG thumbnail of its file."""
    settings = state.settings
    return await read_item_file(
        state,
        item_id,
        partial(thumbnail_jpeg, size=settings.thumbnail_size, max_pixels=settings.max_pixels),
    )


@router.get(
    "/gallery/{item_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **error_responses(404)},
    summary="A JPEG thumbnail of a gallery item",
)
async def get_item_thumbnail(state: State, item_id: ItemId) -> Response:
    _, jpeg = await _thumbnail(state, item_id)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})


@router.get(
    "/gallery/{item_id}/heatmap",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(404)},
    summary="The item's heatmap drawn over its thumbnail, as PNG",
)
async def get_item_heatmap(
    state: State,
    item_id: ItemId,
    opacity: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
) -> Response:
    record, jpeg = await _thumbnail(state, item_id)

    def render() -> bytes:
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
    settings = state.settings
    count = len(images)
    if count > settings.max_add_images:
        raise ApiError(
            413,
            "too_many_images",
            f"{count} images sent; at most {settings.max_add_images} per request",
        )
    per_image_labels = _spread(labels or [], count, "labels")
    per_image_extra = _parse_metadata(metadata, count)
    _check_items(per_image_labels, per_image_extra)  # before any upload is read or written
    blobs = [await read_upload(upload, settings) for upload in images]

    def decode_all() -> list[tuple[DecodedImage, Any]]:
        decoded = []
        for index, (upload, data) in enumerate(zip(images, blobs, strict=True)):
            try:
                decoded.append(decode_for_network(data, upload.content_type, state))
            except ImageRejected as error:
                raise ImageRejected(
                    error.status, error.code, f"image {index}: {error.message}"
                ) from None
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
    written = [source for source in sources if source]

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

    try:
        result, records, size = await state.store.run(add)
    except BaseException:  # nothing was added: the files written for it go too
        await state.store.run(lambda gallery: state.store.discard_unreferenced(gallery, written))
        raise
    state.metrics.gallery_items.set(size)
    duplicates = set(result.duplicates)  # input positions already in the gallery
    return AddResponse(
        items=[
            AddedItem(
                id=int(record.id),
                sha256=record.sha256,
                label=record.label,
                source=state.store.public_source(str(record.source)),
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


def _spread(values: list[str], count: int, name: str) -> list[str | None]:
    """One value per image from none, one for all, or one each (400 otherwise)."""
    if not values:
        return [None] * count
    if len(values) == 1:
        return [values[0]] * count
    if len(values) != count:
        raise ApiError(400, f"bad_{name}", f"{len(values)} {name} for {count} images")
    return list(values)


def _parse_metadata(text: str | None, count: int) -> list[dict[str, Any] | None]:
    """The metadata field as one JSON object per image (400 ``bad_metadata`` otherwise).

    Size and nesting are bounded on the text, before parsing: one object per image at most
    ``MAX_METADATA_BYTES``, nested at most ``MAX_METADATA_DEPTH`` (one more for the list).
    """
    if text is None or text == "":
        return [None] * count
    limit = count * (MAX_METADATA_BYTES + 2) + 2
    size = len(text.encode("utf-8", errors="replace"))
    if size > limit:
        raise ApiError(
            400,
            "bad_metadata",
            f"metadata is {size} bytes; the limit is {limit} for {count} images",
        )
    if nests_deeper(text, MAX_METADATA_DEPTH + 1):
        raise ApiError(
            400, "bad_metadata", f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels"
        )
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


def _check_items(labels: list[str | None], extras: list[dict[str, Any] | None]) -> None:
    """The gallery's label and metadata limits (:mod:`index.limits`), as 400 ``bad_labels`` or
    ``bad_metadata`` naming the image, checked before anything is written."""
    for position, (label, extra) in enumerate(zip(labels, extras, strict=True)):
        try:
            check_label(position, label)
            check_metadata(position, extra)
        except InvalidItemError as error:
            code = "bad_labels" if error.field == "label" else "bad_metadata"
            raise ApiError(400, code, f"image {position}: {error.field} {error.reason}") from None


def _extension(image_format: str) -> str:
    """A safe file extension for a stored upload of this Pillow format."""
    name = image_format.lower()
    name = {"jpeg": "jpg", "mpo": "jpg"}.get(name, name)
    return name if name.isalnum() and name.isascii() else "img"
