"""Operator actions on the running service: swap in a gallery rebuilt offline.

No ``from __future__ import annotations``: FastAPI evaluates the route annotations.
"""

from fastapi import APIRouter, Depends

from app.service.dependencies import API_PREFIX, ApiError, State, check_api_key, error_responses
from app.service.inference import StartupError
from app.service.schemas import ReloadResponse

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["admin"])


@router.post(
    "/admin/reload-gallery",
    response_model=ReloadResponse,
    responses=error_responses(401, 403, 409),
    dependencies=[Depends(check_api_key)],
    summary="Re-open the gallery directory (rebuilt offline) and swap it in atomically",
)
async def reload_gallery(state: State) -> ReloadResponse:
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
