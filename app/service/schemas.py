"""Request and response models of the HTTP API (they define the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_RECTANGLES",
    "AddResponse",
    "AddedItem",
    "DeleteResponse",
    "ErrorResponse",
    "ExplainResponse",
    "ExplainedImage",
    "Health",
    "Heatmap",
    "ItemResponse",
    "Match",
    "PrototypeExplanation",
    "QueryInfo",
    "Readiness",
    "Regions",
    "ReloadResponse",
    "SearchResponse",
    "Timings",
]

MAX_RECTANGLES = 64


class ErrorResponse(BaseModel):
    """Every error the service itself raises (validation errors use FastAPI's 422 model)."""

    detail: str = Field(description="what was wrong, for humans")
    code: str = Field(description="machine-readable reason, e.g. 'not_an_image'")


class Heatmap(BaseModel):
    """Pooling weights of the feature-map grid: how much each location contributed."""

    height: int
    width: int
    grid: list[list[float]] = Field(description="row-major weights, mean 1 over the grid")
    overlay_url: str | None = Field(
        default=None, description="PNG overlay of the heatmap on the image (URL or data URL)"
    )


class Match(BaseModel):
    id: int
    rank: int = Field(description="1 for the best match")
    score: float = Field(description="cosine similarity")
    label: str | None
    source: str
    metadata: dict[str, Any]
    image_url: str
    thumbnail_url: str
    heatmap: Heatmap | None = None


class QueryInfo(BaseModel):
    width: int = Field(description="the upload's width in pixels, upright; for an item, the grid's")
    height: int = Field(
        description="the upload's height in pixels, upright; for an item, the grid's"
    )
    format: str | None = Field(description="decoded format, or null for a stored item")
    frames: int = Field(description="frames in the upload; only the first is used")
    id: int | None = Field(default=None, description="the gallery item used as the query")
    heatmap: Heatmap | None = None


class Timings(BaseModel):
    decode_ms: float
    embed_ms: float
    search_ms: float
    total_ms: float


class SearchResponse(BaseModel):
    model_fingerprint: str
    crop_fraction: float = Field(
        description="heatmaps cover the centred square of this fraction of the short side"
    )
    k: int
    label: str | None
    query: QueryInfo
    matches: list[Match]
    timings: Timings


class ItemResponse(BaseModel):
    id: int
    source: str
    sha256: str
    label: str | None
    added_at: str | float | None
    metadata: dict[str, Any]
    image_url: str
    thumbnail_url: str
    heatmap: Heatmap


class AddedItem(BaseModel):
    id: int
    sha256: str
    label: str | None
    source: str
    duplicate: bool = Field(description="the image was already in the gallery under this id")


class AddResponse(BaseModel):
    items: list[AddedItem]
    gallery_size: int


class DeleteResponse(BaseModel):
    id: int
    deleted: bool
    gallery_size: int


class ReloadResponse(BaseModel):
    previous_size: int
    gallery_size: int
    model_fingerprint: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model_fingerprint: str
    device: str
    gallery_size: int
    batching: bool
    batch_max_size: int


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
    """Rectangles ``[x0, y0, x1, y1]`` on the original query image (the region search's
    ``regions`` form field, as JSON)."""

    model_config = ConfigDict(extra="forbid")

    favour: list[list[float]] = Field(default_factory=list, max_length=MAX_RECTANGLES)
    ignore: list[list[float]] = Field(default_factory=list, max_length=MAX_RECTANGLES)
    units: str = Field(default="fraction", pattern="^(fraction|pixels)$")
