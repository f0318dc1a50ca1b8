"""The demo page in a real headless Chromium, against `clip-pipeline local --serve` on the embedded
emulator: upload a real photo, see its labels and nearest images; search by text."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from clip_worker.labels import DEFAULT_LABELS
from tests.support import PHOTOS, TINY_MODEL, encode, photo

#: Debian's packages (`make test` installs them); the browser test does not run without them.
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
#: Screenshots are kept here for people to look at (CI keeps the folder as an artefact).
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


class Served:
    """`clip-pipeline local --serve --json` as a subprocess, its stdout collected line by line."""

    def __init__(self, command: list[str]) -> None:
        environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("{") and '"url"' in line and self.url is None:
                self.url = json.loads(line)["url"]
                self._found.set()
        self._found.set()

    def wait_for_url(self, timeout: float) -> str:
        self._found.wait(timeout)
        if self.url is None:
            self.process.kill()
            errors = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"clip-pipeline local --serve printed no URL:\n{''.join(self.lines)}\n{errors}")
        return self.url

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.lines if line.startswith('{"level"')]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_checkpoint: Path) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("uploads")
    (folder / "cat.jpg").write_bytes(encode(photo("chelsea.png"), "JPEG", quality=90))
    (folder / "astronaut.png").write_bytes(encode(photo("astronaut.png"), "PNG"))
    (folder / "coffee.webp").write_bytes(encode(photo("coffee.png"), "WEBP", quality=90))
    shutil.copy(PHOTOS / "rocket.jpg", folder / "rocket.jpg")
    command = [
        sys.executable, "-m", "clip_pipeline", "local", str(folder),
        "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--model-config", str(tiny_config),
        "--batching-window", "1", "--serve", "--port", "0", "--json",
    ]  # fmt: skip
    server = Served(command)
    server.wait_for_url(timeout=240)
    yield server
    server.process.send_signal(signal.SIGINT)
    server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver (make test does)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The closed network refuses Chromium's background connections; these flags keep it from trying.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def test_a_person_uploads_a_photo_and_searches_by_text(served: Served, browser: webdriver.Chrome) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(browser, 60)
    browser.get(served.wait_for_url(0))
    wait.until(lambda driver: TINY_MODEL in driver.find_element(By.ID, "model").text)

    browser.find_element(By.ID, "file").send_keys(str(PHOTOS / "rocket.jpg"))
    labels = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#labels li"))
    assert len(labels) == 5
    assert all(label.find_element(By.CLASS_NAME, "label").text in DEFAULT_LABELS for label in labels)
    results = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#image-results figure"))
    # The photo was uploaded to the pipeline too: the nearest stored image is itself.
    assert len(results) == 4
    assert (results[0].find_element(By.TAG_NAME, "figcaption").get_attribute("title") or "").endswith("/rocket.jpg")
    assert results[0].find_element(By.TAG_NAME, "b").text == "1.000"
    # The previews are presigned URLs the browser fetched from the (emulated) input bucket.
    wait.until(
        lambda driver: all(
            driver.execute_script("return arguments[0].naturalWidth", image) > 0
            for image in driver.find_elements(By.CSS_SELECTOR, "#image-results img")
        )
    )

    browser.find_element(By.ID, "query").send_keys("an astronaut")
    browser.find_element(By.CSS_SELECTOR, "#text-search button").click()
    found = wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#text-results figure"))
    assert len(found) == 4
    assert "of 4 stored images" in browser.find_element(By.ID, "text-status").text
    assert browser.find_element(By.ID, "error").is_displayed() is False
    browser.save_screenshot(str(ARTIFACTS / "demo-page.png"))


def test_the_page_shows_the_apis_reason_when_it_refuses(served: Served, browser: webdriver.Chrome, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(browser, 60)
    browser.get(served.wait_for_url(0))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("a text file with an image's name")
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    error = wait.until(
        lambda driver: driver.find_element(By.ID, "error") if driver.find_element(By.ID, "error").is_displayed() else None
    )
    assert error is not None and "send one of the accepted image types" in error.text
    browser.save_screenshot(str(ARTIFACTS / "demo-page-error.png"))


def test_every_log_line_of_a_request_carries_its_id(served: Served) -> None:
    assert served.url is not None
    response = requests.get(
        f"{served.url}search", params={"q": "a rocket", "k": "2"}, headers={"X-Request-Id": "trace-page-1"}, timeout=30
    )
    assert response.status_code == 200
    deadline = threading.Event()
    for _ in range(50):
        lines = [log for log in served.logs() if log.get("request_id") == "trace-page-1"]
        if lines:
            break
        deadline.wait(0.1)
    assert lines and lines[-1]["message"] == "request" and lines[-1]["path"] == "/search" and lines[-1]["status"] == 200
    # Every line the API wrote while serving, from the event loop or the model's threads (the store
    # opening, for one), names its request.
    api_lines = [log for log in served.logs() if log.get("service") == "clip-query"]
    assert any(log["message"] == "vector store opened" for log in api_lines)
    assert all(log.get("request_id") for log in api_lines)
