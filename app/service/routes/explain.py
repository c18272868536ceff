"""Explainable retrieval: why a gallery item matched a query, and search by region.

``POST /v1/explain`` decomposes the similarity of a query (an upload or a gallery item) and a
gallery item over GSP prototypes; ``POST /v1/search/regions`` re-pools the query's feature map
with marked regions favoured or ignored and searches with the result. Both run the network
through the inference engine, on its thread; gallery items store only embeddings and weight
grids, so their feature maps are recomputed from their source image.

No ``from __future__ import annotations``: FastAPI evaluates the route annotations.
"""

import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, File, Form, Request, UploadFile
from PIL import Image

from app.service.dependencies import (
    API_PREFIX,
    MAX_ITEM_ID,
    ApiError,
    State,
    decode_for_network,
    decode_upload,
    error_responses,
    read_item_file,
    read_upload,
)
from app.service.images import DecodedImage, ImageRejected, decode_file
from app.service.regions import MarkedRegions, check_aspect, parse_regions
from app.service.rendering import inline_heatmap
from app.service.schemas import (
    ExplainedImage,
    ExplainResponse,
    Heatmap,
    PrototypeExplanation,
    SearchResponse,
)
from app.service.searching import (
    SearchQuery,
    item_urls,
    network_square,
    record_stage,
    run_search,
    upload_search_response,
)
from app.service.state import ServiceState
from model.explain import DEFAULT_REGION_STRENGTH, ExplainError, NotGSPError, PairExplanation

__all__ = ["router"]

MAX_TOP = 16

router = APIRouter(prefix=API_PREFIX)
# A 422 is either FastAPI's validation error or the service's own error for k above max_k.
_VALIDATION_OR_API_ERROR: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "Validation error, or k above max_k (code bad_k)",
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/HTTPValidationError"},
                        {"$ref": "#/components/schemas/ErrorResponse"},
                    ]
                }
            }
        },
    }
}
NetworkImage = tuple[DecodedImage, torch.Tensor]  # decoded, and cropped for the network


async def _uploaded(upload: UploadFile, state: ServiceState) -> NetworkImage:
    """An uploaded query image, decoded and cropped on the image workers."""
    data = await read_upload(upload, state.settings)
    return await state.workers.run(decode_for_network, data, upload.content_type, state)


async def _stored(state: ServiceState, item_id: int) -> tuple[Any, NetworkImage]:
    """A gallery item's record and its source image, decoded as an upload would be."""

    def load(path: Path) -> NetworkImage:
        decoded = decode_file(
            path, max_pixels=state.settings.max_pixels, min_side=state.engine.min_side
        )
        return decoded, state.engine.prepare(decoded.image)

    return await read_item_file(state, item_id, load)


def _heatmap(square: Image.Image | None, grid: torch.Tensor) -> Heatmap:
    """A weights grid as JSON, with its PNG overlay on ``square`` unless that is None."""
    return inline_heatmap(square, grid.float().numpy())


def _described(
    request: Request, record: Any, decoded: DecodedImage, heatmap: Heatmap
) -> ExplainedImage:
    width, height = decoded.size
    if record is None:
        return ExplainedImage(id=None, width=width, height=height, heatmap=heatmap)
    return ExplainedImage(
        id=int(record.id),
        width=width,
        height=height,
        label=record.label,
        source=request.app.state.service.store.public_source(str(record.source)),
        heatmap=heatmap,
        **item_urls(request, int(record.id)),
    )


@router.post(
    "/explain",
    response_model=ExplainResponse,
    responses=error_responses(400, 404, 409, 413, 415),
    summary="Why a gallery item matches a query: the score split over GSP prototypes",
    tags=["explain"],
)
async def explain(
    request: Request,
    state: State,
    gallery_id: Annotated[
        int, Form(ge=0, le=MAX_ITEM_ID, description="the gallery item to explain")
    ],
    image: Annotated[UploadFile | None, File(description="query image")] = None,
    query_id: Annotated[
        int | None,
        Form(ge=0, le=MAX_ITEM_ID, description="a gallery item as the query, instead of an image"),
    ] = None,
    top: Annotated[int, Form(ge=1, le=MAX_TOP, description="prototypes to report")] = 3,
    overlays: Annotated[bool, Form(description="include PNG overlays as data URLs")] = True,
) -> ExplainResponse:
    begun = time.perf_counter()
    if image is not None and query_id is None:
        query_record, (query, query_tensor) = None, await _uploaded(image, state)
    elif image is None and query_id is not None:
        query_record, (query, query_tensor) = await _stored(state, query_id)
    else:
        raise ApiError(400, "bad_query", "send exactly one of an image upload and query_id")
    match_record, (match, match_tensor) = await _stored(state, gallery_id)
    stored = await state.store.run(lambda gallery: gallery.embedding(gallery_id))
    try:
        explained = await state.engine.explain(query_tensor, match_tensor, top=top)
    except NotGSPError as error:
        raise ApiError(409, "needs_gsp", str(error)) from None

    def render() -> ExplainResponse:
        stored_score = None
        if stored is not None:
            query_embedding = torch.nn.functional.normalize(explained.query.embedding, dim=0)
            stored_score = float(np.dot(query_embedding.float().numpy(), stored))
        query_square = network_square(state, query.image) if overlays else None
        match_square = network_square(state, match.image) if overlays else None
        return ExplainResponse(
            model_fingerprint=state.engine.fingerprint,
            crop_fraction=state.engine.crop_fraction,
            score=explained.score,
            stored_score=stored_score,
            shared_share=explained.shared_share,
            decomposition_error=explained.decomposition_error,
            query=_described(
                request, query_record, query, _heatmap(query_square, explained.query.weights)
            ),
            match=_described(
                request, match_record, match, _heatmap(match_square, explained.match.weights)
            ),
            prototypes=_prototypes(explained, query_square, match_square),
            total_ms=(time.perf_counter() - begun) * 1000.0,
        )

    return await state.workers.run(render)


def _prototypes(
    explained: PairExplanation, query: Image.Image | None, match: Image.Image | None
) -> list[PrototypeExplanation]:
    return [
        PrototypeExplanation(
            prototype=part.prototype,
            term=part.term,
            share=part.share,
            contribution=part.contribution,
            query=_heatmap(query, part.query_map),
            match=_heatmap(match, part.match_map),
        )
        for part in explained.top
    ]


async def _mask(upload: UploadFile | None, state: ServiceState, name: str) -> np.ndarray | None:
    """An image-space mask in [0, 1] from an uploaded picture (greyscale / 255), or None."""
    if upload is None:
        return None
    try:
        data = await read_upload(upload, state.settings)
        decoded = await state.workers.run(decode_upload, data, upload.content_type, state)
    except ImageRejected as error:
        raise ImageRejected(error.status, error.code, f"{name}: {error.message}") from None
    return np.asarray(decoded.image.convert("L"), dtype=np.float64) / 255.0


@router.post(
    "/search/regions",
    response_model=SearchResponse,
    responses={**error_responses(400, 409, 413, 415), **_VALIDATION_OR_API_ERROR},
    summary="Search with marked regions of the query favoured or ignored (GSP re-pooling)",
    tags=["search"],
)
async def search_regions(
    request: Request,
    state: State,
    image: Annotated[UploadFile, File(description="query image (any Pillow format)")],
    regions: Annotated[
        str | None,
        Form(
            description='JSON {"favour": [[x0, y0, x1, y1], ...], "ignore": [...], "units": '
            '"fraction" (default) or "pixels"} on the original image'
        ),
    ] = None,
    favour_mask: Annotated[
        UploadFile | None, File(description="mask image: bright = favour (query's aspect ratio)")
    ] = None,
    ignore_mask: Annotated[
        UploadFile | None, File(description="mask image: bright = ignore (query's aspect ratio)")
    ] = None,
    strength: Annotated[
        float, Form(gt=0.0, le=10.0, description="cost shift of marked locations")
    ] = DEFAULT_REGION_STRENGTH,
    transport_ratio: Annotated[
        float | None,
        Form(gt=0.0, le=1.0, description="experimental: pool this share of the mass instead"),
    ] = None,
    k: Annotated[
        int | None,
        Form(ge=1, description="number of matches (default: the service's default_k; max_k)"),
    ] = None,
    label: Annotated[str | None, Form(description="only return items with this label")] = None,
    heatmaps: Annotated[bool, Form(description="include heatmaps")] = True,
) -> SearchResponse:
    begun = started = time.perf_counter()
    settings = state.settings
    k = settings.default_k if k is None else k
    if k > settings.max_k:
        raise ApiError(422, "bad_k", f"k must be at most {settings.max_k}, got {k}")
    spec = parse_regions(regions)
    decoded, tensor = await _uploaded(image, state)
    masks = {
        "favour_mask": await _mask(favour_mask, state, "favour_mask"),
        "ignore_mask": await _mask(ignore_mask, state, "ignore_mask"),
    }
    for name, mask in masks.items():
        if mask is not None:
            check_aspect(mask, decoded.size, name)
    decode_ms = record_stage(request, "decode", started)
    marks = MarkedRegions(
        spec, decoded.size, masks["favour_mask"], masks["ignore_mask"], state.engine.preprocessing
    )
    started = time.perf_counter()
    try:
        embedded = await state.engine.repool(
            tensor, marks, strength=strength, transport_ratio=transport_ratio
        )
    except NotGSPError as error:
        raise ApiError(409, "needs_gsp", str(error)) from None
    except ExplainError as error:
        raise ApiError(400, "bad_regions", str(error)) from None
    embed_ms = record_stage(request, "embed", started)
    query = SearchQuery(k, label, heatmaps, begun)
    pairs, search_ms = await run_search(request, state, embedded.embedding, query)
    return await upload_search_response(
        request, state, decoded, embedded.weights, pairs, query, (decode_ms, embed_ms, search_ms)
    )
