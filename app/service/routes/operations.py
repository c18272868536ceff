"""Probes and metrics for orchestrators and Prometheus; never refused by the in-flight limit.

No ``from __future__ import annotations``: FastAPI evaluates the route annotations.
"""

from fastapi import APIRouter
from fastapi.responses import Response

from app.service.dependencies import ApiError, State
from app.service.metrics import CONTENT_TYPE_LATEST
from app.service.schemas import ErrorResponse, Health, Readiness

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorResponse}},
    summary="Readiness: model loaded, inference worker running, gallery open",
)
async def readyz(state: State) -> Readiness:
    if not state.engine.batcher.running:
        raise ApiError(503, "not_ready", "the inference worker is not running")
    size = await state.store.run(len)
    return Readiness(
        status="ready",
        model_fingerprint=state.engine.fingerprint,
        device=str(state.engine.device),
        gallery_size=size,
        batching=state.settings.batching,
        batch_max_size=state.settings.effective_batch_size,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
async def prometheus_metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
