"""Search the gallery with an uploaded image or with a stored item's embedding.

No ``from __future__ import annotations``: FastAPI evaluates the route annotations.
"""

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile

from app.service.dependencies import (
    API_PREFIX,
    ApiError,
    FormMatchCount,
    ItemId,
    QueryMatchCount,
    State,
    decode_for_network,
    error_responses,
    read_upload,
)
from app.service.rendering import heatmap_model
from app.service.schemas import QueryInfo, SearchResponse, Timings
from app.service.searching import (
    SearchQuery,
    build_matches,
    heatmap_url,
    record_stage,
    run_search,
    upload_search_response,
)

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["search"])


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=error_responses(400, 413, 415, 503),
    summary="Search the gallery with an uploaded image",
)
async def search(
    request: Request,
    state: State,
    image: Annotated[UploadFile, File(description="query image (any Pillow format)")],
    k: FormMatchCount,
    label: Annotated[str | None, Form(description="only return items with this label")] = None,
    heatmaps: Annotated[bool, Form(description="include heatmaps")] = True,
) -> SearchResponse:
    begun = started = time.perf_counter()
    data = await read_upload(image, state.settings)
    decoded, tensor = await state.workers.run(decode_for_network, data, image.content_type, state)
    decode_ms = record_stage(request, "decode", started)
    started = time.perf_counter()
    embedded = await state.engine.embed(tensor)
    embed_ms = record_stage(request, "embed", started)
    query = SearchQuery(k, label, heatmaps, begun)
    pairs, search_ms = await run_search(request, state, embedded.embedding, query)
    return await upload_search_response(
        request, state, decoded, embedded.weights, pairs, query, (decode_ms, embed_ms, search_ms)
    )


@router.post(
    "/search/by-id/{item_id}",
    response_model=SearchResponse,
    responses=error_responses(404),
    summary="Search with the stored embedding of a gallery item (the item itself excluded)",
)
async def search_by_id(
    request: Request,
    state: State,
    item_id: ItemId,
    k: QueryMatchCount,
    label: Annotated[str | None, Query(description="only items with this label")] = None,
    heatmaps: Annotated[bool, Query(description="include heatmaps")] = True,
) -> SearchResponse:
    begun = started = time.perf_counter()
    embedding, record = await state.store.run(lambda g: (g.embedding(item_id), g.get(item_id)))
    if embedding is None or record is None:
        raise ApiError(404, "unknown_id", f"no gallery item with id {item_id}")
    decode_ms = record_stage(request, "decode", started)
    query = SearchQuery(k, label, heatmaps, begun)
    pairs, search_ms = await run_search(request, state, np.asarray(embedding), query, item_id)
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
            heatmap=heatmap_model(weights, heatmap_url(request, item_id)) if heatmaps else None,
        ),
        matches=build_matches(request, pairs, heatmaps),
        timings=Timings(
            decode_ms=decode_ms,
            embed_ms=0.0,
            search_ms=search_ms,
            total_ms=(time.perf_counter() - begun) * 1000.0,
        ),
    )
