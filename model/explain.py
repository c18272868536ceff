"""Explainable retrieval with GSP: why a match matched, and search by region.

GSP's transport plan is the explanation.  The pooled vector is ``f = (1/n) sum_i w_i z_i`` with
``w_i = g_i / mu``, and the plan splits each location's transported mass over the prototypes
(``plan[k, i] = A_ki g_i / n``), so ``f = sum_k f_k`` with ``f_k = (1/mu) sum_i plan[k, i] z_i``.
The cosine similarity of two pooled vectors is therefore a sum of prototype-to-prototype terms
``<f_k^q, f_l^g> / (|f^q| |f^g|)``; the diagonal ``(k, k)`` terms say which parts both images
share, and each prototype's plan row says where in each image that part was found.

The same transport takes a per-location ``unary_cost``: lowering it on marked locations favours
them, raising it ignores them, so a query can be re-pooled from its cached feature map by region
without running the backbone again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import Preprocessing
from model.gsp import GeneralizedSumPooling
from model.net import EmbeddingNet, EmbeddingOutput

__all__ = [
    "DEFAULT_REGION_STRENGTH",
    "ExplainError",
    "NotGSPError",
    "PairExplanation",
    "PooledParts",
    "PrototypeMatch",
    "crop_box",
    "explain_pair",
    "image_mask_to_feature_mask",
    "location_terms",
    "pooled_parts",
    "rectangles_to_mask",
    "region_unary_cost",
    "repool_with_ratio",
    "repool_with_regions",
]

# Location-to-prototype costs are distances in [0, 2]: shifting marked locations by the whole
# range makes them cheaper (favour) or dearer (ignore) than every unmarked location.
DEFAULT_REGION_STRENGTH = 2.0
# The terms are computed in float64 from a float32 pooling: they must add up to the score.
_DECOMPOSITION_TOLERANCE = 1e-4
_RASTER = 8  # sample points per feature-map cell side when rasterising rectangles


class ExplainError(ValueError):
    """The request cannot be explained or re-pooled: bad shapes, masks, regions or ratio."""


class NotGSPError(ExplainError):
    """The network does not pool with GSP: it has no transport plan to read or steer."""


def _require_gsp(net: EmbeddingNet, what: str) -> GeneralizedSumPooling:
    pooling = net.pooling
    if not isinstance(pooling, GeneralizedSumPooling):
        raise NotGSPError(
            f"{what} needs a GSP network (a transport plan to read or steer); this network "
            f"pools with {type(pooling).__name__}, whose weights are not a transport"
        )
    return pooling


def _single_map(features: Tensor, name: str) -> Tensor:
    """A ``(1, C, h, w)`` view of one feature map given as ``(C, h, w)`` or ``(1, C, h, w)``."""
    if features.dim() == 3:
        features = features[None]
    if features.dim() != 4 or features.shape[0] != 1:
        raise ExplainError(
            f"{name} must be one (C, h, w) or (1, C, h, w) feature map, got {tuple(features.shape)}"
        )
    return features


# -- why a match matched ------------------------------------------------------------------------


@dataclass(frozen=True)
class PooledParts:
    """One image's GSP pooling split over prototypes.

    ``parts`` ``(m, d)`` float64 with ``parts.sum(0) == embedding`` (unnormalised);
    ``maps`` ``(m, h, w)`` is each prototype's transported mass scaled like the pooling weights,
    so ``maps.sum(0) == weights`` (mean 1 over the grid).
    """

    embedding: Tensor
    weights: Tensor
    parts: Tensor
    maps: Tensor


@torch.no_grad()
def pooled_parts(net: EmbeddingNet, features: Tensor) -> PooledParts:
    """Pool one feature map with the trained ratio and split the result over prototypes."""
    pooling = _require_gsp(net, "explaining a match")
    features = _single_map(features, "features")
    result = pooling(features)
    projected = pooling.projection(features).flatten(2)[0].double()  # (d, n)
    plan = result.plan[0].double()  # (m, h, w)
    n = plan.shape[1] * plan.shape[2]
    ratio = pooling.transport_ratio
    parts = torch.einsum("kn,dn->kd", plan.flatten(1), projected) / ratio
    return PooledParts(
        embedding=result.embedding[0].double(),
        weights=result.weights[0].double(),
        parts=parts,
        maps=plan * (n / ratio),
    )


@dataclass(frozen=True)
class PrototypeMatch:
    """A prototype both images use: its ``(k, k)`` term of the score, that term's ``share`` of
    the score, its ``contribution`` (see :attr:`PairExplanation.contributions`) and where each
    image sends mass to it (``(h, w)`` maps, scaled like weights)."""

    prototype: int
    term: float
    share: float
    contribution: float
    query_map: Tensor
    match_map: Tensor


@dataclass(frozen=True)
class PairExplanation:
    """The cosine ``score`` of a query and a match, decomposed over prototypes.

    ``terms[k, l] = <f_k^q, f_l^g> / (|f^q| |f^g|)`` ``(m, m)`` sums to ``score``;
    ``top`` lists the largest shared-prototype (diagonal) terms, best first.
    """

    score: float
    terms: Tensor
    query: PooledParts
    match: PooledParts
    top: list[PrototypeMatch]

    @property
    def shared_share(self) -> float:
        """Share of the score carried by same-prototype terms (the diagonal)."""
        return _share(float(torch.diagonal(self.terms).sum()), self.score)

    @property
    def contributions(self) -> Tensor:
        """``(m,)`` each prototype's part of the score, summing to it: half of what flows
        through it on the query side (``terms[k, :].sum()``) plus half on the match side.

        The diagonal alone is often a small share: all parts share a common direction, so
        cross-prototype terms carry much of the score.
        """
        return (self.terms.sum(dim=1) + self.terms.sum(dim=0)) / 2

    @property
    def decomposition_error(self) -> float:
        """``|sum of terms - score|``: float error only."""
        return abs(float(self.terms.sum()) - self.score)


def _share(term: float, score: float) -> float:
    return term / score if abs(score) > 1e-12 else 0.0


def explain_pair(
    net: EmbeddingNet, query_features: Tensor, match_features: Tensor, top: int = 5
) -> PairExplanation:
    """Decompose the similarity of two images (given as backbone feature maps) over prototypes.

    Raises :class:`ExplainError` for a non-GSP network or bad shapes.
    """
    if top < 1:
        raise ExplainError(f"top must be at least 1, got {top}")
    query = pooled_parts(net, query_features)
    match = pooled_parts(net, match_features)
    norms = query.embedding.norm() * match.embedding.norm()
    if float(norms) == 0.0:
        raise ExplainError("an embedding is zero; its similarity is undefined")
    score = float(query.embedding @ match.embedding / norms)
    terms = query.parts @ match.parts.T / norms
    error = abs(float(terms.sum()) - score)
    if error > _DECOMPOSITION_TOLERANCE:
        raise RuntimeError(
            f"prototype terms sum to {float(terms.sum()):.6f}, not the score {score:.6f}: the "
            "GSP pooling no longer equals the plan-weighted mean this decomposition assumes"
        )
    diagonal = torch.diagonal(terms)
    contributions = (terms.sum(dim=1) + terms.sum(dim=0)) / 2
    order = torch.argsort(diagonal, descending=True)[: min(top, diagonal.numel())]
    best = [
        PrototypeMatch(
            prototype=int(k),
            term=float(diagonal[k]),
            share=_share(float(diagonal[k]), score),
            contribution=float(contributions[k]),
            query_map=query.maps[k],
            match_map=match.maps[k],
        )
        for k in order
    ]
    return PairExplanation(score=score, terms=terms, query=query, match=match, top=best)


@torch.no_grad()
def location_terms(net: EmbeddingNet, features: Tensor, other: Tensor) -> Tensor:
    """``(h, w)`` additive terms of the cosine similarity between the image of ``features`` and
    a unit vector ``other`` (e.g. the query's embedding), one per location of that image.

    ``cos = sum_i (w_i / n) <z_i, other> / |f|``: the plan summed over prototypes, so the
    terms add up to the similarity; a location with a large weight whose feature points away
    from ``other`` gets a small or negative term.
    """
    pooling = _require_gsp(net, "splitting a similarity over locations")
    features = _single_map(features, "features")
    result = pooling(features)
    projected = pooling.projection(features)[0].double()  # (d, h, w)
    target = other.reshape(-1).double().to(projected.device)
    if target.numel() != projected.shape[0]:
        raise ExplainError(f"other must have {projected.shape[0]} values, got {target.numel()}")
    n = projected.shape[1] * projected.shape[2]
    aligned = torch.einsum("dhw,d->hw", projected, target)
    return result.weights[0].double() * aligned / (n * result.embedding[0].double().norm())


# -- search by region --------------------------------------------------------------------------


def _feature_mask(mask: Tensor | np.ndarray | None, size: tuple[int, int], name: str) -> Tensor:
    """A float ``(h, w)`` mask in [0, 1] (zeros when ``mask`` is None)."""
    if mask is None:
        return torch.zeros(size, dtype=torch.float32)
    values = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask)
    values = values.detach().float().cpu()
    if tuple(values.shape) != size:
        raise ExplainError(
            f"{name} must have the feature map's shape {size}, got {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
        raise ExplainError(f"{name} values must lie in [0, 1]")
    return values


def region_unary_cost(
    map_size: tuple[int, int],
    favour_mask: Tensor | np.ndarray | None = None,
    ignore_mask: Tensor | np.ndarray | None = None,
    strength: float = DEFAULT_REGION_STRENGTH,
) -> Tensor | None:
    """The ``(h, w)`` unary cost that favours and ignores the marked locations, or None when
    nothing is marked.  Masks are booleans or coverages in [0, 1] at feature-map resolution."""
    if not np.isfinite(strength) or strength <= 0:
        raise ExplainError(f"strength must be a positive number, got {strength}")
    favour = _feature_mask(favour_mask, map_size, "favour_mask")
    ignore = _feature_mask(ignore_mask, map_size, "ignore_mask")
    if bool(((favour > 0) & (ignore > 0)).any()):
        raise ExplainError("a location cannot be both favoured and ignored")
    if not bool((favour > 0).any() or (ignore > 0).any()):
        return None
    return strength * (ignore - favour)


def repool_with_regions(
    net: EmbeddingNet,
    features: Tensor,
    favour_mask: Tensor | np.ndarray | None = None,
    ignore_mask: Tensor | np.ndarray | None = None,
    strength: float = DEFAULT_REGION_STRENGTH,
    transport_ratio: float | None = None,
) -> EmbeddingOutput:
    """Re-pool a cached ``(1, C, h, w)`` or ``(C, h, w)`` feature map with the marked locations'
    transport costs lowered by ``strength`` (favour) or raised by it (ignore).

    No backbone pass.  The transport still moves the trained ratio of the mass (or
    ``transport_ratio``, see :func:`repool_with_ratio`), so favoured locations saturate first and
    ignored ones are used only when nothing else is left.  With no marked location and no ratio
    this is exactly ``net.pool(features)``.
    """
    _require_gsp(net, "search by region")
    features = _single_map(features, "features")
    if transport_ratio is not None and not (
        isinstance(transport_ratio, int | float) and 0 < transport_ratio <= 1
    ):
        raise ExplainError(f"transport_ratio must lie in (0, 1], got {transport_ratio!r}")
    size = (int(features.shape[2]), int(features.shape[3]))
    unary = region_unary_cost(size, favour_mask, ignore_mask, strength)
    with torch.no_grad():
        return net.pool(
            features,
            unary_cost=None if unary is None else unary[None].to(features.device),
            transport_ratio=None if transport_ratio is None else float(transport_ratio),
        )


def repool_with_ratio(
    net: EmbeddingNet, features: Tensor, transport_ratio: float
) -> EmbeddingOutput:
    """Re-pool with another transport ratio: query-time selectivity (smaller = fewer locations).

    Experimental: gallery items were embedded with the trained ratio, so a query pooled with
    another one is compared with vectors of a slightly different kind.
    """
    return repool_with_regions(net, features, transport_ratio=transport_ratio)


# -- image space to feature-map space --------------------------------------------------------


def crop_box(width: int, height: int, preprocessing: Preprocessing) -> tuple[float, float, float]:
    """``(left, top, side)`` in original pixels of the square the network sees.

    ``eval_transform`` resizes the short side to ``resize_size`` and centre-crops
    ``image_size``: a centred square of ``crop_pct`` of the short side (beyond it when padding).
    """
    if width < 1 or height < 1:
        raise ExplainError(f"image size must be positive, got {width}x{height}")
    side = min(width, height) * preprocessing.crop_pct
    return (width - side) / 2, (height - side) / 2, side


def _sample_points(
    width: int, height: int, map_size: tuple[int, int], preprocessing: Preprocessing
) -> tuple[Tensor, Tensor]:
    """Original-pixel x (columns) and y (rows) of ``_RASTER`` sample points per map cell."""
    left, top, side = crop_box(width, height, preprocessing)
    h, w = map_size
    ys = top + (torch.arange(h * _RASTER, dtype=torch.float64) + 0.5) / (h * _RASTER) * side
    xs = left + (torch.arange(w * _RASTER, dtype=torch.float64) + 0.5) / (w * _RASTER) * side
    return xs, ys


def rectangles_to_mask(
    rectangles: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    map_size: tuple[int, int],
    preprocessing: Preprocessing,
    pixels: bool = False,
) -> Tensor:
    """Coverage ``(h, w)`` in [0, 1] of each feature-map location by a union of rectangles.

    ``rectangles`` are ``(x0, y0, x1, y1)`` on the original image (``image_size = (width,
    height)``), as fractions of its width and height or, with ``pixels``, in pixels.  The
    centre crop of the preprocessing is accounted for: parts outside it mark nothing.
    """
    width, height = image_size
    limit_x, limit_y = (width, height) if pixels else (1.0, 1.0)
    xs, ys = _sample_points(width, height, map_size, preprocessing)
    inside = torch.zeros(len(ys), len(xs), dtype=torch.bool)
    for rectangle in rectangles:
        if len(rectangle) != 4 or not all(np.isfinite(float(v)) for v in rectangle):
            raise ExplainError(f"a rectangle is four numbers x0, y0, x1, y1, got {rectangle!r}")
        x0, y0, x1, y1 = (float(v) for v in rectangle)
        if not (0 <= x0 < x1 <= limit_x and 0 <= y0 < y1 <= limit_y):
            unit = f"pixels of a {width}x{height} image" if pixels else "fractions in [0, 1]"
            raise ExplainError(
                f"rectangle {list(rectangle)} must satisfy 0 <= x0 < x1 <= width and "
                f"0 <= y0 < y1 <= height ({unit})"
            )
        if not pixels:
            x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
        inside |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return F.avg_pool2d(inside[None].float(), _RASTER)[0]


def image_mask_to_feature_mask(
    mask: np.ndarray | Tensor, map_size: tuple[int, int], preprocessing: Preprocessing
) -> Tensor:
    """Coverage ``(h, w)`` in [0, 1] of each location by an image-space mask ``(H, W)``.

    The mask has the original image's size; values are booleans or in [0, 1] (e.g. a greyscale
    PNG divided by 255).  The centre crop of the preprocessing is accounted for.
    """
    values = torch.as_tensor(np.asarray(mask)).double()
    if values.dim() != 2 or values.numel() == 0:
        raise ExplainError(
            f"an image mask must be a non-empty (H, W) array, got {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
        raise ExplainError("image mask values must lie in [0, 1]")
    height, width = values.shape
    xs, ys = _sample_points(width, height, map_size, preprocessing)
    rows = ys.floor().long().clamp(0, height - 1)
    cols = xs.floor().long().clamp(0, width - 1)
    # A crop larger than the resized image (image_size > resize_size) pads: nothing is marked.
    on_image = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
    sampled = values[rows][:, cols] * on_image
    return F.avg_pool2d(sampled[None].float(), _RASTER)[0]
