"""Property-based checks of the OpenAPI document with schemathesis against the real server:
no 5xx, and every status code, content type, header and body is the one documented."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from app.service.main import create_app
from tests.test_service_support import ServiceAssets, serve_in_thread, shared_assets

EXAMPLES_PER_OPERATION = 12
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="session")
def service_assets(tmp_path_factory: pytest.TempPathFactory) -> ServiceAssets:
    return shared_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def base_url(service_assets: ServiceAssets) -> Iterator[str]:
    # No API key is sent: write routes must answer their documented 401, and the shared
    # gallery is never modified by random cases.
    with serve_in_thread(create_app(service_assets.settings(gallery_read_only=True))) as url:
        yield url


@pytest.mark.slow
def test_openapi_conformance(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=CHECKS, timeout=30)

        check()
