"""The web page in a real browser (Debian's chromium driven by Playwright, never downloaded).

CI needs ``apt-get install -y chromium`` and the ``playwright`` Python package; without
/usr/bin/chromium the test skips and says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from tests.test_service_support import drawn_image

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

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (CI: apt-get install -y chromium)"
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    try:
        yield opened
    finally:
        context.close()


PAINTED_PIXELS = """(canvas) => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
  return painted;
}"""


def test_upload_shows_matches_and_heatmaps(
    read_only_server: str, page: Page, tmp_path: Path
) -> None:
    query = tmp_path / "query.png"
    drawn_image("blue", 2).save(query)
    # A standing listener turns on file-chooser interception before any key is pressed; without
    # it Playwright can miss a chooser opened right after the listener is added.
    page.on("filechooser", lambda chooser: None)
    page.goto(read_only_server + "/")
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


STRONGEST_COLOUR = """(canvas) => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let best = -1, rgb = null;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > best) { best = data[i + 3]; rgb = [data[i], data[i + 1], data[i + 2]]; }
  }
  return rgb;
}"""


# Chromium does not report multipart bodies holding files to Playwright, so the page's fetch
# calls are recorded in the page itself: their URLs and text fields.
RECORD_FETCHES = """(() => {
  window.sentForms = [];
  const original = window.fetch;
  window.fetch = (url, init) => {
    const fields = {};
    if (init && init.body instanceof FormData) {
      for (const [key, value] of init.body.entries()) {
        fields[key] = typeof value === "string" ? value : `file ${value.name}`;
      }
    }
    window.sentForms.push({ url: String(url), fields });
    return original(url, init);
  };
})();"""


def search_for(page: Page, read_only_server: str, query: Path) -> None:
    """Open the page and search with ``query`` (the hidden file input, as a drop would)."""
    page.add_init_script(RECORD_FETCHES)
    page.goto(read_only_server + "/")
    page.set_input_files("#file-input", str(query))
    page.wait_for_selector("#results li")
    page.wait_for_selector("#region-tools:not([disabled])")


def last_form(page: Page, path: str) -> dict[str, str]:
    """The text fields of the page's latest POST to ``path``."""
    sent = [form for form in page.evaluate("window.sentForms") if form["url"] == path]
    assert sent, f"the page sent nothing to {path}"
    return sent[-1]["fields"]


def test_explain_shows_each_part_in_one_colour_on_query_and_match(
    read_only_server: str, page: Page, tmp_path: Path
) -> None:
    query = tmp_path / "query.png"
    drawn_image("green", 1).save(query)
    search_for(page, read_only_server, query)
    explain = page.get_by_role("button", name="Explain match 1", exact=True)
    explain.focus()  # keyboard accessible: a real button, activated with Enter
    with page.expect_response("**/v1/explain"):
        page.keyboard.press("Enter")
    fields = last_form(page, "/v1/explain")
    assert fields["image"] == "file query.png"
    first_id = page.locator("#results li a").first.get_attribute("href") or ""
    assert first_id == f"/v1/gallery/{fields['gallery_id']}/image"
    page.locator("#explain-panel").wait_for(state="visible")
    assert page.evaluate("document.activeElement.id") == "explain-title"
    parts = page.locator("#explain-parts li")
    assert parts.count() >= 1
    colours = []
    for index in range(parts.count()):
        part = parts.nth(index)
        caption = part.locator("figcaption").inner_text()
        assert re.fullmatch(r"part \d+ · -?\d+(\.\d)?% of score", caption.strip()), caption
        drawn = {}
        for side in ("query", "match"):
            canvas = part.locator(f'canvas.part-map[data-side="{side}"][data-drawn="true"]')
            canvas.wait_for()
            assert canvas.evaluate(PAINTED_PIXELS) > 0
            drawn[side] = canvas.evaluate(STRONGEST_COLOUR)
        assert drawn["query"] == drawn["match"]  # one colour per part, on both images
        colours.append(tuple(drawn["query"]))
    assert len(set(colours)) == len(colours)  # and a different colour for each part
    page.click("#explain-close")
    assert page.locator("#explain-panel").is_hidden()
    assert "failed" not in page.inner_text("#status")


def test_favour_rectangle_drawn_with_the_mouse_drives_the_region_search(
    read_only_server: str, page: Page, tmp_path: Path
) -> None:
    query = tmp_path / "query.png"
    drawn_image("red", 3).save(query)
    search_for(page, read_only_server, query)
    image = page.locator("#query-image")
    page.wait_for_function("document.getElementById('query-image').naturalWidth > 0")
    box = image.bounding_box()
    assert box is not None

    def drag(x0: float, y0: float, x1: float, y1: float) -> None:
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=4)
        page.mouse.up()

    drag(0.2, 0.3, 0.6, 0.9)
    assert page.inner_text("#region-count") == "1 favoured, 0 ignored"
    page.check('input[name="region-mode"][value="ignore"]')
    drag(0.9, 0.1, 0.7, 0.4)  # dragged right to left: still a proper rectangle
    assert page.inner_text("#region-count") == "1 favoured, 1 ignored"
    with page.expect_response("**/v1/search/regions"):
        page.click("#region-search")
    fields = last_form(page, "/v1/search/regions")
    regions = json.loads(fields["regions"])
    assert regions["units"] == "fraction"
    assert regions["favour"][0] == pytest.approx([0.2, 0.3, 0.6, 0.9], abs=0.02)
    assert regions["ignore"][0] == pytest.approx([0.7, 0.1, 0.9, 0.4], abs=0.02)
    assert "transport_ratio" not in fields  # the slider was not touched
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('1 favoured and 1 ignored')"
    )
    assert page.locator("#results li").count() >= 1
    assert page.locator('canvas.heatmap[data-heatmap="query"][data-drawn="true"]').count() == 1
    # The selectivity slider re-runs the region search with a transport ratio.
    with page.expect_response("**/v1/search/regions"):
        page.fill("#ratio-slider", "0.7")
    fields = last_form(page, "/v1/search/regions")
    assert float(fields["transport_ratio"]) == pytest.approx(0.3)
    assert json.loads(fields["regions"]) == regions  # the same rectangles
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('30% of the mass')"
    )
    page.click("#clear-regions")
    assert page.inner_text("#region-count") == "No regions"
    assert "failed" not in page.inner_text("#status")


def test_choosing_a_file_searches_once_and_the_matches_are_in_view(
    read_only_server: str, browser: Browser, tmp_path: Path
) -> None:
    """At 1280x1000 the first matches sit beside the query, above the fold; choosing a file
    sends one search, and the page does not ask for a second press."""
    query = tmp_path / "query.png"
    drawn_image("blue", 1).save(query)
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        search_for(page, read_only_server, query)
        page.wait_for_function("!document.getElementById('search-button').disabled")
        searches = [f for f in page.evaluate("window.sentForms") if f["url"] == "/v1/search"]
        assert len(searches) == 1
        assert "Press Search" not in page.inner_text("body")
        first = page.locator("#results li").first.bounding_box()
        assert first is not None and first["y"] + first["height"] <= 1000
        assert page.evaluate("window.scrollY") == 0
        page.screenshot(path=str(tmp_path / "page.png"))
    finally:
        context.close()


def test_docs_render_with_nothing_fetched_from_outside(read_only_server: str, page: Page) -> None:
    outside: list[str] = []

    def only_local(route: Route) -> None:
        if route.request.url.startswith(read_only_server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(read_only_server + "/docs")
    page.wait_for_selector(".swagger-ui .opblock")
    assert page.locator(".opblock-summary-path", has_text="/v1/search").count() >= 1
    assert outside == []
