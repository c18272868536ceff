"""What the search-like routes share: the gallery-thread search, stage timings, item links, the
ranked match models and the response of a search by uploaded image."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from PIL import Image

from app.service.dependencies import API_PREFIX
from app.service.images import DecodedImage, thumbnail
from app.service.rendering import centre_crop, heatmap_model, inline_heatmap
from app.service.schemas import Match, QueryInfo, SearchResponse, Timings
from app.service.state import ServiceState

__all__ = [
    "SearchQuery",
    "build_matches",
    "heatmap_url",
    "item_urls",
    "network_square",
    "record_stage",
    "run_search",
    "search_gallery",
    "upload_search_response",
]


@dataclass(frozen=True)
class SearchQuery:
    """What a search asked for, and when its request began (for the total time)."""

    k: int
    label: str | None
    heatmaps: bool
    begun: float


def record_stage(request: Request, name: str, started: float) -> float:
    """Record a stage duration (ms) for the access log and metrics; returns it."""
    elapsed = (time.perf_counter() - started) * 1000.0
    request.state.stages[name] = elapsed
    return elapsed


def _item_url(request: Request, item_id: int) -> str:
    """An item's URL, honouring a proxy's ``root_path``."""
    return f"{request.scope.get('root_path', '')}{API_PREFIX}/gallery/{item_id}"


def item_urls(request: Request, item_id: int) -> dict[str, str]:
    """Image and thumbnail URLs of an item."""
    base = _item_url(request, item_id)
    return {"image_url": f"{base}/image", "thumbnail_url": f"{base}/thumbnail"}


def heatmap_url(request: Request, item_id: int) -> str:
    """The URL of an item's heatmap PNG."""
    return f"{_item_url(request, item_id)}/heatmap"


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


async def run_search(
    request: Request,
    state: ServiceState,
    embedding: np.ndarray,
    query: SearchQuery,
    exclude: int | None = None,
) -> tuple[list[tuple[Any, Any]], float]:
    """:func:`search_gallery` on the gallery thread, timed as the ``search`` stage."""
    started = time.perf_counter()
    pairs = await state.store.run(search_gallery(embedding, query.k, query.label, exclude))
    return pairs, record_stage(request, "search", started)


def build_matches(request: Request, pairs: list[tuple[Any, Any]], heatmaps: bool) -> list[Match]:
    """The response models of :func:`search_gallery`'s (match, record) pairs, ranked from 1."""
    store = request.app.state.service.store
    matches = []
    for rank, (match, record) in enumerate(pairs, start=1):
        heatmap = None
        if heatmaps and record.weights is not None:
            heatmap = heatmap_model(record.weights, heatmap_url(request, record.id))
        matches.append(
            Match(
                id=int(record.id),
                rank=rank,
                score=float(match.score),
                label=record.label,
                source=store.public_source(str(record.source)),
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
