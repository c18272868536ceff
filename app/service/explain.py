"""Explainable retrieval routes: why a gallery item matched a query, and search by region.

``POST /v1/explain`` decomposes the similarity of a query (an upload or a gallery item) and a
gallery item over GSP prototypes (:func:`model.explain.explain_pair`); ``POST
/v1/search/regions`` re-pools the query's feature map with marked regions favoured or ignored
(:func:`model.explain.repool_with_regions`) and searches with the result.  Gallery items store
only embeddings and weight grids, so their feature maps are recomputed from their source image.

No ``from __future__ import annotations``: FastAPI evaluates the route annotations.
"""

import json
import time
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, File, Form, Request, UploadFile
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.service.api import (
    MAX_ITEM_ID,
    ApiError,
    SearchQuery,
    State,
    decode_upload,
    error_responses,
    item_urls,
    network_square,
    read_upload,
    record_stage,
    search_gallery,
    upload_search_response,
)
from app.service.images import DecodedImage, ImageRejected, decode_image
from app.service.rendering import inline_heatmap
from app.service.schemas import Heatmap, SearchResponse
from app.service.state import ServiceState
from model.explain import (
    DEFAULT_REGION_STRENGTH,
    ExplainError,
    NotGSPError,
    explain_pair,
    image_mask_to_feature_mask,
    rectangles_to_mask,
    repool_with_regions,
)

__all__ = [
    "ExplainResponse",
    "ExplainedImage",
    "PrototypeExplanation",
    "Regions",
    "router",
]

MAX_TOP = 16
MAX_RECTANGLES = 64
_ASPECT_TOLERANCE = 0.02

router = APIRouter(prefix="/v1")
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


class PrototypeExplanation(BaseModel):
    """One prototype both images use, and where each image found it."""

    prototype: int = Field(description="index of the GSP prototype")
    term: float = Field(description="this prototype's (k, k) term of the cosine similarity")
    share: float = Field(description="term / score")
    contribution: float = Field(
        description="the prototype's part of the score: half the terms through it on each "
        "side (all prototypes' contributions sum to the score)"
    )
    query: Heatmap = Field(description="mass the query sends to this prototype, per location")
    match: Heatmap = Field(description="mass the match sends to this prototype, per location")


class ExplainedImage(BaseModel):
    id: int | None = Field(description="gallery item id, or null for an upload")
    width: int
    height: int
    label: str | None = None
    source: str | None = None
    image_url: str | None = None
    thumbnail_url: str | None = None
    heatmap: Heatmap = Field(description="pooling weights (the sum of all prototypes' maps)")


class ExplainResponse(BaseModel):
    model_fingerprint: str
    crop_fraction: float = Field(
        description="heatmaps cover the centred square of this fraction of the short side"
    )
    score: float = Field(description="cosine similarity of the two images' embeddings")
    stored_score: float | None = Field(
        description="similarity with the match's stored gallery embedding (what search ranks by)"
    )
    shared_share: float = Field(description="share of the score carried by same-prototype terms")
    decomposition_error: float = Field(description="|sum of all prototype terms - score|")
    query: ExplainedImage
    match: ExplainedImage
    prototypes: list[PrototypeExplanation] = Field(description="largest shared terms first")
    total_ms: float


class Regions(BaseModel):
    """Rectangles ``[x0, y0, x1, y1]`` on the original query image."""

    model_config = ConfigDict(extra="forbid")

    favour: list[list[float]] = Field(default_factory=list, max_length=MAX_RECTANGLES)
    ignore: list[list[float]] = Field(default_factory=list, max_length=MAX_RECTANGLES)
    units: str = Field(default="fraction", pattern="^(fraction|pixels)$")


# -- images and feature maps -------------------------------------------------------------------


async def _gallery_image(state: ServiceState, item_id: int) -> tuple[Any, DecodedImage]:
    """A gallery item's record and its decoded source image (404 when either is missing)."""
    record = await state.store.run(lambda gallery: gallery.get(item_id))
    if record is None:
        raise ApiError(404, "unknown_id", f"no gallery item with id {item_id}")
    path = state.store.resolve_source(str(record.source))
    if path is None:
        raise ApiError(404, "image_unavailable", f"the image of item {item_id} is not available")

    def load() -> DecodedImage:
        data = path.read_bytes()
        return decode_image(
            data,
            content_type=None,
            max_bytes=max(len(data), 1),
            max_pixels=state.settings.max_pixels,
            min_side=state.engine.min_side,
        )

    try:
        return record, await state.workers.run(load)
    except (ImageRejected, OSError) as error:
        raise ApiError(
            404, "image_unavailable", f"the image of item {item_id} is unusable: {error}"
        ) from None


async def _upload_image(upload: UploadFile, state: ServiceState) -> DecodedImage:
    data = await read_upload(upload, state.settings)
    return await state.workers.run(decode_upload, data, upload.content_type, state)


def _feature_map(state: ServiceState, image: Image.Image) -> torch.Tensor:
    """The backbone's ``(1, C, h, w)`` map of one image (no pooling)."""
    tensor = state.engine.inputs([state.engine.prepare(image)])
    return state.engine.net.features(tensor)


def _heatmap(square: Image.Image | None, grid: torch.Tensor | np.ndarray) -> Heatmap:
    """A weights grid as JSON, with its PNG overlay on ``square`` unless that is None."""
    values = grid.detach().float().cpu().numpy() if isinstance(grid, torch.Tensor) else grid
    return inline_heatmap(square, values)


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
        source=str(record.source),
        heatmap=heatmap,
        **item_urls(request, int(record.id)),
    )


# -- routes --------------------------------------------------------------------------------------


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
    if (image is None) == (query_id is None):
        raise ApiError(400, "bad_query", "send exactly one of an image upload and query_id")
    if image is not None:
        query_record, query_image = None, await _upload_image(image, state)
    else:
        query_record, query_image = await _gallery_image(state, query_id)
    match_record, match_image = await _gallery_image(state, gallery_id)
    stored = await state.store.run(lambda gallery: gallery.embedding(gallery_id))

    def work() -> ExplainResponse:
        with torch.inference_mode():
            query_map = _feature_map(state, query_image.image)
            match_map = _feature_map(state, match_image.image)
            explained = explain_pair(state.engine.net, query_map, match_map, top=top)
            query_embedding = torch.nn.functional.normalize(explained.query.embedding, dim=0)
        stored_score = None
        if stored is not None:
            stored_score = float(np.dot(query_embedding.float().cpu().numpy(), stored))
        q_img = network_square(state, query_image.image) if overlays else None
        m_img = network_square(state, match_image.image) if overlays else None
        return ExplainResponse(
            model_fingerprint=state.engine.fingerprint,
            crop_fraction=state.engine.crop_fraction,
            score=explained.score,
            stored_score=stored_score,
            shared_share=explained.shared_share,
            decomposition_error=explained.decomposition_error,
            query=_described(
                request,
                query_record,
                query_image,
                _heatmap(q_img, explained.query.weights),
            ),
            match=_described(
                request,
                match_record,
                match_image,
                _heatmap(m_img, explained.match.weights),
            ),
            prototypes=[
                PrototypeExplanation(
                    prototype=part.prototype,
                    term=part.term,
                    share=part.share,
                    contribution=part.contribution,
                    query=_heatmap(q_img, part.query_map),
                    match=_heatmap(m_img, part.match_map),
                )
                for part in explained.top
            ],
            total_ms=(time.perf_counter() - begun) * 1000.0,
        )

    try:
        return await state.workers.run(work)
    except NotGSPError as error:
        raise ApiError(409, "needs_gsp", str(error)) from None


def _parse_regions(text: str | None) -> Regions:
    if text is None or not text.strip():
        return Regions()
    try:
        return Regions.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise ApiError(400, "bad_regions", f"regions is not valid JSON: {error}") from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'regions'}: {e['msg']}" for e in error.errors()
        )
        raise ApiError(
            400,
            "bad_regions",
            'regions must look like {"favour": [[x0, y0, x1, y1], ...], "ignore": [...], '
            f'"units": "fraction" | "pixels"}}: {problems}',
        ) from None


async def _mask_image(upload: UploadFile | None, state: ServiceState, name: str) -> Any:
    """An image-space mask in [0, 1] from an uploaded picture (greyscale / 255), or None."""
    if upload is None:
        return None
    try:
        decoded = await _upload_image(upload, state)
    except ImageRejected as error:
        raise ImageRejected(error.status, error.code, f"{name}: {error.message}") from None
    return np.asarray(decoded.image.convert("L"), dtype=np.float64) / 255.0


def _check_aspect(mask: np.ndarray, size: tuple[int, int], name: str) -> None:
    width, height = size
    mask_height, mask_width = mask.shape
    if abs(mask_width / mask_height - width / height) > _ASPECT_TOLERANCE * width / height:
        raise ApiError(
            400,
            "bad_mask",
            f"{name} is {mask_width}x{mask_height}; it must have the query's aspect ratio "
            f"({width}x{height})",
        )


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
    spec = _parse_regions(regions)
    decoded = await _upload_image(image, state)
    masks = {
        "favour_mask": await _mask_image(favour_mask, state, "favour_mask"),
        "ignore_mask": await _mask_image(ignore_mask, state, "ignore_mask"),
    }
    for name, mask in masks.items():
        if mask is not None:
            _check_aspect(mask, decoded.size, name)
    decode_ms = record_stage(request, "decode", started)

    def embed() -> Any:
        preprocessing = state.engine.preprocessing
        with torch.inference_mode():
            features = _feature_map(state, decoded.image)
        size = (int(features.shape[2]), int(features.shape[3]))
        marked = {}
        for kind, rectangles in (("favour", spec.favour), ("ignore", spec.ignore)):
            coverage = torch.zeros(size)
            if rectangles:
                coverage = rectangles_to_mask(
                    rectangles, decoded.size, size, preprocessing, spec.units == "pixels"
                )
            mask = masks[f"{kind}_mask"]
            if mask is not None:
                coverage = torch.maximum(
                    coverage, image_mask_to_feature_mask(mask, size, preprocessing)
                )
            marked[kind] = coverage
        with torch.inference_mode():
            return repool_with_regions(
                state.engine.net,
                features,
                favour_mask=marked["favour"],
                ignore_mask=marked["ignore"],
                strength=strength,
                transport_ratio=transport_ratio,
            )

    started = time.perf_counter()
    try:
        output = await state.workers.run(embed)
    except NotGSPError as error:
        raise ApiError(409, "needs_gsp", str(error)) from None
    except ExplainError as error:
        raise ApiError(400, "bad_regions", str(error)) from None
    embed_ms = record_stage(request, "embed", started)
    embedding = output.embedding[0].float().cpu().numpy()
    weights = output.weights[0].float().cpu().numpy()
    started = time.perf_counter()
    pairs = await state.store.run(search_gallery(embedding, k, label, None))
    search_ms = record_stage(request, "search", started)
    return await upload_search_response(
        request,
        state,
        decoded,
        weights,
        pairs,
        SearchQuery(k, label, heatmaps, begun),
        (decode_ms, embed_ms, search_ms),
    )
