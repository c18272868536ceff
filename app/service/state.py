"""What the routes share: settings, the inference engine, the gallery store and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from app.service.inference import InferenceEngine
from app.service.metrics import ServiceMetrics
from app.service.settings import Settings
from app.service.store import GalleryStore

__all__ = ["ServiceState", "service_state"]


@dataclass
class ServiceState:
    settings: Settings
    engine: InferenceEngine
    store: GalleryStore
    metrics: ServiceMetrics


def service_state(request: Request) -> ServiceState:
    """FastAPI dependency: the application's :class:`ServiceState`."""
    return request.app.state.service
