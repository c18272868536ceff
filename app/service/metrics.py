"""Prometheus metrics of one application instance (its own registry, so apps never collide).

Under ``gsp serve --processes N`` the server sets ``PROMETHEUS_MULTIPROC_DIR`` before starting
its processes: prometheus-client then keeps every value in files there, and ``/metrics`` from
any process reports the sums over all of them (gauges: requests in flight, their limits and
bodies being read summed over live processes, saturation if any process is saturated, the
gallery size as last set). Info metrics cannot be shared that way; each process
reports its own, which are the same model and gallery in every process.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    multiprocess,
)

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """Request, stage, batching and gallery metrics; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gsp_http_requests",
            "HTTP requests by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gsp_http_request_duration_seconds",
            "HTTP request latency by route template and status",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "gsp_stage_duration_seconds",
            "Time spent per request stage (decode, embed, search)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "gsp_batch_size",
            "Images per forward pass of the micro-batcher",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "gsp_batch_duration_seconds",
            "Duration of one batched forward pass",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gsp_http_requests_in_flight",
            "Requests in progress (probes and metrics not counted)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.in_flight_limit = Gauge(
            "gsp_http_requests_in_flight_limit",
            "The in-flight limit (GSP_MAX_IN_FLIGHT)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.saturated = Gauge(
            "gsp_http_saturated",
            "1 while every in-flight slot is taken (new requests get 503); /readyz stays ready",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.reading_bodies = Gauge(
            "gsp_http_requests_reading_body",
            "Requests whose bodies are still arriving (they hold no in-flight slot)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.gallery_items = Gauge(
            "gsp_gallery_items",
            "Items in the served gallery",
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self._own = CollectorRegistry()  # what only this process can report
        self.model_info = Info("gsp_model", "The served model", registry=self._own)
        self.gallery_info = Info("gsp_gallery", "The served gallery", registry=self._own)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not shared:
            return generate_latest(self.registry) + generate_latest(self._own)
        every_process = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_process, path=shared)
        return generate_latest(every_process) + generate_latest(self._own)
