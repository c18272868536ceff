"""The web page in a real browser (Debian's chromium driven by Playwright, never downloaded).

CI needs ``apt-get install -y chromium`` and the ``playwright`` Python package; without
/usr/bin/chromium the test skips and says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from app.service.main import create_app
from tests.test_service_support import ServiceAssets, drawn_image, serve_in_thread, shared_assets

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (CI: apt-get install -y chromium)"
)


@pytest.fixture(scope="session")
def service_assets(tmp_path_factory: pytest.TempPathFactory) -> ServiceAssets:
    return shared_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def base_url(service_assets: ServiceAssets) -> Iterator[str]:
    with serve_in_thread(create_app(service_assets.settings(gallery_read_only=True))) as url:
        yield url


PAINTED_PIXELS = """(canvas) => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
  return painted;
}"""


def test_upload_shows_matches_and_heatmaps(base_url: str, tmp_path: Path) -> None:
    query = tmp_path / "query.png"
    drawn_image("blue", 2).save(query)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(base_url + "/")
            # Keyboard: the drop zone is focusable and Enter opens the file chooser.
            page.focus("#drop-zone")
            with page.expect_file_chooser() as chooser:
                page.keyboard.press("Enter")
            chooser.value.set_files(str(query))
            page.wait_for_selector("#results li")
            assert page.locator("#results li").count() >= 1
            assert "blue" in page.locator("#results li").first.inner_text()
            query_canvas = page.locator('canvas.heatmap[data-heatmap="query"][data-drawn="true"]')
            query_canvas.wait_for()
            match_canvas = page.locator('canvas.heatmap[data-heatmap="match"][data-drawn="true"]')
            match_canvas.first.wait_for()
            assert query_canvas.evaluate(PAINTED_PIXELS) > 0
            assert match_canvas.first.evaluate(PAINTED_PIXELS) > 0
            # Opacity is a CSS variable: instant, no redraw.
            page.fill("#opacity-slider", "0.8")
            assert query_canvas.evaluate("c => getComputedStyle(c).opacity") == "0.8"
            page.uncheck("#heatmap-toggle")
            assert query_canvas.evaluate("c => getComputedStyle(c).display") == "none"
            assert "Search failed" not in page.inner_text("#status")
        finally:
            browser.close()
