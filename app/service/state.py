"""What the routes share: settings, the inference engine, the gallery store, the image workers
and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from app.service.inference import InferenceEngine
from app.service.metrics import ServiceMetrics
from app.service.settings import Settings
from app.service.store import GalleryStore
from app.service.workers import CpuWorkers

__all__ = ["ServiceState", "service_state"]


@dataclass
class ServiceState:
    settings: Settings
    engine: InferenceEngine
    store: GalleryStore
    workers: CpuWorkers
    metrics: ServiceMetrics


async def service_state(request: Request) -> ServiceState:
    """FastAPI dependency: the application's :class:`ServiceState`.

    ``async`` because FastAPI runs a plain ``def`` dependency on its thread pool: a thread
    hand-off per request for an attribute lookup.
    """
    return request.app.state.service
