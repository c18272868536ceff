"""The HTTP routes: one module-level router per concern.

Under ``/v1``: :mod:`.search` (by upload, by item), :mod:`.gallery` (items, their files,
writes), :mod:`.admin` (gallery reload) and :mod:`.explain` (explanations, search by region);
outside it, :mod:`.operations` (probes and metrics) and :mod:`.keys` (the page's key form).
Each ``/v1`` router carries the prefix itself, so that a request's route template (logs,
metrics) is its full path. Shared dependencies live in :mod:`app.service.dependencies`, request
and response models in :mod:`app.service.schemas`.
"""

from app.service.routes import admin, explain, gallery, keys, operations, search

__all__ = ["KEY_FORM_ROUTER", "OPERATIONS_ROUTER", "V1_ROUTERS"]

V1_ROUTERS = (search.router, gallery.router, admin.router, explain.router)
OPERATIONS_ROUTER = operations.router
KEY_FORM_ROUTER = keys.router
