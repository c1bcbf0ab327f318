"""The demo page (GET /ui, service/demo/index.html) in a real browser: Debian's chromium, driven by
Playwright, against the session's real server (conftest.server). The page's #status carries
data-state="busy|done|error": the tests wait on it, never on the clock.

Screenshot of the page of digits: results/demo/demo.png (docs/demo.png is a copy of one)."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
from conftest import ROOT

from loadtest.samples import png
from models.pages import synth_page

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    sync_playwright is None or CHROMIUM is None,
    reason="the demo page's browser test needs a system chromium and the playwright package: "
           "`apt-get install chromium` and `pip install -e '.[dev]'` (never `playwright install`)")
TIMEOUT_MS = 20_000  # an upper bound only: each step takes well under a second


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def ui(browser, server):
    """A fresh page (own localStorage) on /ui, ~1000 px wide; no uncaught script error allowed."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(f"{server.url}/ui")
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def upload(page, name: str, data: bytes) -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": "image/png", "buffer": data}])


def score_map(url: str, image: bytes, **form: str) -> dict:
    form = {"outputs": "detections,heatmap", "threshold": "0.8", "scales": "1", "invert": "false", **form}
    response = httpx.post(f"{url}/score_map", files={"image": ("page.png", image)}, data=form, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_page_of_digits_gets_boxes_and_a_heat_map(ui, server, mnist):
    digit_page = synth_page(np.random.default_rng(11), mnist[1].images, mnist[1].labels, 200, 260, 8,
                            spacing=0.3)
    image = png(digit_page.image)
    api = score_map(server.url, image)

    upload(ui, "page.png", image)  # 260×200: auto mode picks "find digits"
    status, boxes = ui.locator("#status"), ui.locator("#boxes .box")
    expect(status).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    expect(ui.locator("body")).to_have_attribute("data-mode", "detect")
    expect(boxes).to_have_count(len(api["detections"]))
    shown = boxes.evaluate_all("gs => gs.map(g => g.dataset.label)")
    assert sorted(shown) == sorted(d["label"] for d in api["detections"])
    assert {str(v) for v in digit_page.labels} <= set(shown)

    # Boxes are in image pixels: on screen, each sits at its place in the (scaled) image.
    frame = ui.locator("#frame").bounding_box()
    fit = frame["width"] / api["image"]["width"]
    for i in (0, len(shown) - 1):
        x0, y0, x1, y1 = api["detections"][i]["box"]
        rect = boxes.nth(i).locator("rect").bounding_box()  # stroke included: compare centres
        assert rect["x"] + rect["width"] / 2 == pytest.approx(frame["x"] + (x0 + x1) / 2 * fit, abs=0.5)
        assert rect["y"] + rect["height"] / 2 == pytest.approx(frame["y"] + (y0 + y1) / 2 * fit, abs=0.5)
        assert rect["width"] == pytest.approx((x1 - x0) * fit, abs=3)

    heat = ui.locator("#heat")
    expect(heat).to_be_visible()
    natural = heat.evaluate("img => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
    assert natural == [260, 200]  # the heat map covers the image, pixel for pixel
    out = ROOT / "results" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    ui.screenshot(path=str(out / "demo.png"), full_page=True)

    # Changing a control runs the request again; hiding the heat map is the page's own business.
    ui.locator("#scales").fill("0.75,1")
    ui.locator("#scales").blur()
    expect(status).to_contain_text("scales 0.75, 1", timeout=TIMEOUT_MS)
    expect(boxes).to_have_count(len(score_map(server.url, image, scales="0.75,1")["detections"]))
    ui.locator("#heat-on").uncheck()
    expect(heat).to_be_hidden()


def digit(mnist, label: int) -> bytes:
    """A held-out MNIST digit (28×28) as PNG."""
    held = mnist[1]
    return png(held.images[np.flatnonzero(held.labels == label)[0]])


def test_single_digit_gets_its_top_k_with_the_api_key_sent(ui, mnist):
    label = 7
    image = digit(mnist, label)
    ui.locator("#key").fill("demo-key")
    ui.locator("#key").blur()  # saved on change
    with ui.expect_request("**/classify") as request:
        upload(ui, "digit.png", image)  # 28×28: auto mode picks "classify"
    assert request.value.headers["authorization"] == "Bearer demo-key"
    expect(ui.locator("#status")).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    expect(ui.locator("body")).to_have_attribute("data-mode", "classify")
    expect(ui.locator("#labels li")).to_have_count(3)
    expect(ui.locator("#labels")).to_be_visible()
    expect(ui.locator("#labels li .label").first).to_have_text(str(label))
    assert ui.evaluate("localStorage.getItem('convserve.apiKey')") == "demo-key"


def test_a_bad_upload_shows_the_server_message(ui, mnist):
    upload(ui, "notes.png", b"these are notes, not a PNG\n")
    status = ui.locator("#status")
    expect(status).to_have_attribute("data-state", "error", timeout=TIMEOUT_MS)
    expect(status).to_contain_text("415 unsupported_image: notes.png is not an image in a supported format")
    upload(ui, "digit.png", digit(mnist, 3))  # and the page goes on working
    expect(status).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)


def test_ui_and_the_api_page_at_root_are_open_and_offline(browser, server):
    """/ui and / load without an API key, and in a real browser no request of theirs leaves this server
    (BentoML's Swagger page at / loaded Google Tag Manager from the internet)."""
    from service.fronts.gate import is_open

    page = httpx.get(f"{server.url}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    assert is_open("/ui") and is_open("/")  # load without an API key; the demo sends the key it is given
    root = httpx.get(f"{server.url}/")
    assert root.status_code == 200 and root.headers["content-type"].startswith("text/html")
    assert "googletagmanager" not in root.text.lower() and "<script" not in root.text.lower()
    for path in ("/classify", "/score_map", "/models", "/admin/models"):  # the API, by route
        assert f"<code>{path}</code>" in root.text, path
    context = browser.new_context()
    requested = []
    context.on("request", lambda request: requested.append(request.url))
    for path in ("/", "/ui"):
        tab = context.new_page()
        tab.goto(f"{server.url}{path}", wait_until="networkidle")
        tab.close()
    # the root page links on to the demo and the document
    tab = context.new_page()
    tab.goto(f"{server.url}/")
    assert tab.get_attribute("a[href='ui']", "href") and tab.get_attribute("a[href='docs.json']", "href")
    context.close()
    assert requested and all(url.startswith(f"{server.url}/") for url in requested), requested
