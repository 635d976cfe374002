"""``GET /`` of the Serve app in a real headless Chromium (Debian's chromium + chromium-driver):
upload an image, wait for the overlay, compare it and the legend with the API's own answers.

Screenshots go to ``$RAYDEEPLAB_ARTIFACTS`` (else the test's temporary folder); the README's are
made with ``RAYDEEPLAB_ARTIFACTS=docs pytest tests/test_page.py``.
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from raydeeplab.serve import app_builder
from tests.s3_server import free_port
from tests.test_serve import blocky, png

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "page-s3cret"
WAIT_S = 60  # a cold replica compiles on 2 busy cores


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_model, tmp_path_factory):
    """Two apps on one Serve proxy: /open without auth, /locked with a bearer token."""
    from ray import serve

    secret = tmp_path_factory.mktemp("secret") / "token"
    secret.write_text(TOKEN)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"model": tiny_model, "max_batch_size": 1}
    serve.run(app_builder(base), name="open", route_prefix="/open")
    serve.run(app_builder({**base, "auth_token_file": str(secret)}), name="locked", route_prefix="/locked")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,760", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> str:
    folder = os.environ.get("RAYDEEPLAB_ARTIFACTS") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    return folder


def upload(browser, url: str, image_path: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url)
    browser.find_element(By.ID, "file").send_keys(image_path)


def wait_for_overlay(browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.find_element(By.ID, "overlay").get_attribute("data-ready")
        or "error" in b.find_element(By.ID, "status").get_attribute("class")
    )
    assert browser.find_element(By.ID, "overlay").get_attribute("data-ready"), browser.find_element(By.ID, "status").text


def legend(browser) -> dict[str, float]:
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tr")
    return {r.get_attribute("data-class"): float(r.get_attribute("data-share")) for r in rows}


def canvas_pixels(browser) -> np.ndarray:
    url = browser.execute_script("return document.getElementById('overlay').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> tuple[str, bytes]:
    """A PNG (lossless: the browser and Pillow see the same pixels) with several classes."""
    data = png(blocky(3, 120, 160))
    path = tmp_path_factory.mktemp("upload") / "blocks.png"
    path.write_bytes(data)
    return str(path), data


def test_page_overlays_the_mask_and_lists_the_classes_the_api_reports(endpoint, browser, picture, artifacts):
    path, data = picture
    upload(browser, f"{endpoint}/open/", path)
    wait_for_overlay(browser)
    browser.save_screenshot(os.path.join(artifacts, "serve_page.png"))

    with httpx.Client(base_url=f"{endpoint}/open", timeout=60) as client:
        answer = client.post("/segment", params={"format": "json"}, files={"image": ("x", data)}).json()
        reference = client.post("/segment", params={"format": "overlay"}, files={"image": ("x", data)})
    shown = legend(browser)
    assert shown == pytest.approx({k: v for k, v in answer["class_areas"].items() if v > 0})
    assert len(shown) >= 2  # a legend with one entry would prove little
    drawn = canvas_pixels(browser)
    expected = np.asarray(Image.open(io.BytesIO(reference.content)).convert("RGB"))
    assert drawn.shape == expected.shape == (120, 160, 3)
    # The page blends in the browser, the server in numpy: rounding may differ by one level.
    assert np.abs(drawn.astype(int) - expected).max() <= 1


def test_a_predict_report_opens_from_disk_with_every_image_and_chart_drawn(ray_local, tiny_model, browser, artifacts, tmp_path):
    """``report.html`` as a person opens it: a file:// page, no server. The browser must decode
    every embedded image and lay out every chart (tests/test_report.py checks the numbers)."""
    from selenium.webdriver.common.by import By

    from raydeeplab.batch import run_predict
    from raydeeplab.config import PredictConfig

    from raydeeplab.data.synthetic import make_shapes_dataset

    make_shapes_dataset(str(tmp_path / "voc"), 10, photos=True)  # shapes drawn over real photos
    folder = tmp_path / "voc" / "JPEGImages"
    (folder / "truncated.png").write_bytes(png(blocky(0, 64, 64))[:200])
    out = tmp_path / "run"
    run_predict(PredictConfig(input=str(folder), output=str(out), model=tiny_model, batch_size=4, decode_batch_size=2))

    browser.set_window_size(1100, 1400)
    browser.get((out / "report.html").as_uri())
    pictures = browser.find_elements(By.TAG_NAME, "img")
    assert len(pictures) == 10
    drawn = browser.execute_script("return [...document.images].map(i => i.complete && i.naturalWidth > 0)")
    assert all(drawn), drawn
    charts = {c.get_attribute("id"): c.size for c in browser.find_elements(By.TAG_NAME, "svg")}
    assert "area" in charts and all(size["width"] > 0 and size["height"] > 0 for size in charts.values()), charts
    assert "truncated.png" in browser.find_element(By.TAG_NAME, "body").text  # the failure, with its path
    browser.save_screenshot(os.path.join(artifacts, "report_predict.png"))


@pytest.mark.large  # an end-to-end repeat of what a default test covers; CI time (pytest -m large)
def test_page_asks_for_the_token_when_the_endpoint_needs_one(endpoint, browser, picture):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    upload(browser, f"{endpoint}/locked/", picture[0])
    WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element(By.ID, "token").is_displayed())
    assert not browser.find_element(By.ID, "overlay").get_attribute("data-ready")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "send").click()
    wait_for_overlay(browser)
    assert len(legend(browser)) >= 2
    stored = browser.execute_script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
    assert TOKEN not in stored  # kept in page memory only
