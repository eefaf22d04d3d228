"""The overview page in a real browser: Debian's chromium, headless, driven by Selenium.

chromedriver is Debian's (``chromium-driver``), named by path, so Selenium
Manager never tries to download one. A missing binary fails the run.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from tests.celery_app import HOSTILE_MESSAGE, HOSTILE_NAME, make_app
from tests.harness import InProcessExporter, scrape
from tests.servers import RedisServer, free_port, wait_for
from tests.test_overview import metric_sum, wait_finished
from tests.test_web_security import bcrypt_hash
from tests.workers import WorkerFactory

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHART_BASELINE = 10 + 220 - 10 - 24  # top + height - top - bottom margins of the chart, in px


def start_browser() -> WebDriver:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    driver = start_browser()
    yield driver
    driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    """Errors the page logged since the last call: failed loads, CSP refusals, exceptions."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def text(driver: WebDriver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def table(driver: WebDriver, table_id: str) -> list[list[str]]:
    """A table's cells as the page shows them, read in one go between two refreshes."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} tbody tr`)]"
        ".map((row) => [...row.cells].map((cell) => cell.textContent))",
        table_id,
    )


def task_rows(driver: WebDriver) -> dict[str, list[str]]:
    """The tasks table as {name: [cells after the name]}."""
    return {row[0]: row[1:] for row in table(driver, "tasks")}


def failures(driver: WebDriver) -> list[dict[str, str]]:
    """The recent failures listed, newest first."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#failures li[data-uuid]')].map((item) => ({"
        "exception: item.querySelector('.exception').textContent,"
        "message: item.querySelector('.message').textContent,"
        "where: item.querySelector('.where').textContent,"
        "traceback: item.querySelector('pre').textContent}))"
    )


def chart_points(driver: WebDriver, state: str) -> list[tuple[float, float]]:
    points = driver.execute_script(
        "const line = document.querySelector(`#chart polyline.state-${arguments[0]}`);"
        "return line ? line.getAttribute('points') : '';",
        state,
    )
    return [(float(x), float(y)) for x, y in (point.split(",") for point in points.split())]


@pytest.fixture
def exporter(clean_redis: RedisServer) -> Iterator[InProcessExporter]:
    running = InProcessExporter(["--broker-url", clean_redis.url])
    wait_for(lambda: running.sample("celery_exporter_broker_connected") == 1, timeout=20)
    yield running
    running.stop()


def test_the_page_draws_a_real_worker_live_and_shows_what_metrics_say(
    browser: WebDriver,
    clean_redis: RedisServer,
    exporter: InProcessExporter,
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory(clean_redis.url)
    browser.get(exporter.url + "/")
    wait_for(lambda: "updated" in text(browser, "#updated"), timeout=10, message="no render")
    assert text(browser, "#connection") == "connected"
    assert not browser.find_element(By.ID, "problem").is_displayed()

    app = make_app(clean_redis.url)
    for index in range(6):
        app.send_task("tests.add", (index, 1))
    app.send_task("tests.fail", ("boom",))
    app.send_task(HOSTILE_NAME)
    wait_finished(exporter, succeeded=6, failed=2)

    # The numbers shown are those of /metrics, once the page has refreshed.
    def shown_matches_metrics() -> bool:
        metrics, rows = scrape(exporter.url), task_rows(browser)
        return all(
            name in rows
            and rows[name][2:5]  # started, succeeded, failed
            == [
                f"{metric_sum(metrics, f'celery_task_{state}_total', name=name):,.0f}"
                for state in ("started", "succeeded", "failed")
            ]
            for name in ("tests.add", "tests.fail", HOSTILE_NAME)
        )

    wait_for(shown_matches_metrics, timeout=15, message=lambda: str(task_rows(browser)))
    assert task_rows(browser)["tests.add"][3] == "6"
    (worker_row,) = table(browser, "workers")
    processed = metric_sum(scrape(exporter.url), "celery_worker_tasks_processed_total")
    assert worker_row[:2] == [worker.hostname, "up"]
    assert f"{processed:,.0f}" in worker_row

    # The failures, newest first, with their exception; the markup in a name or a
    # message is shown as text and never runs.
    wait_for(lambda: len(failures(browser)) == 2, timeout=10)
    listed = failures(browser)
    assert [failure["exception"] for failure in listed] == ["ValueError"] * 2
    by_message = {failure["message"]: failure for failure in listed}
    assert set(by_message) == {"'boom'", repr(HOSTILE_MESSAGE)}
    assert by_message[repr(HOSTILE_MESSAGE)]["where"].startswith(f"{HOSTILE_NAME} · ")
    assert "ValueError: boom" in by_message["'boom'"]["traceback"]
    summary = browser.find_element(By.CSS_SELECTOR, "#failures details summary")
    summary.click()  # the traceback opens on demand
    assert browser.find_element(By.CSS_SELECTOR, "#failures details pre").is_displayed()
    assert HOSTILE_NAME in task_rows(browser)
    assert browser.execute_script("return window.owned") is None
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []

    # The chart is drawn from the 10-second history and fills as tasks run.
    wait_for(lambda: chart_points(browser, "succeeded"), timeout=20, message="no chart")
    drawn = len(chart_points(browser, "succeeded"))
    for index in range(5):
        app.send_task("tests.add", (index, 2))
    wait_for(
        lambda: (
            len(chart_points(browser, "succeeded")) > drawn
            and min(y for _, y in chart_points(browser, "succeeded")) < CHART_BASELINE
            and "succeeded 11 failed 2" in " ".join(text(browser, "#legend").split())
        ),
        timeout=30,
        message=lambda: f"{chart_points(browser, 'succeeded')} {text(browser, '#legend')}",
    )
    for state in ("failed", "retried", "rejected", "revoked"):
        assert len(chart_points(browser, state)) == len(chart_points(browser, "succeeded"))
    assert console_errors(browser) == []


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_with_basic_auth_the_page_and_api_need_credentials(
    browser: WebDriver, tmp_path: Path
) -> None:
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  viewer: {bcrypt_hash('pw')}\n")
    exporter = InProcessExporter(
        ["--broker-url", f"redis://127.0.0.1:{free_port()}/0", "--web-config-file", str(config)]
    )
    try:
        token = base64.b64encode(b"viewer:pw").decode()
        for path in ("/", "/api/v1/overview", "/static/overview.js"):
            assert _status(exporter.url + path) == 401
            assert _status(exporter.url + path, {"Authorization": f"Basic {token}"}) == 200
        browser.get(exporter.url + "/")
        assert "Celery overview" not in browser.page_source  # Chromium's own 401 view
        assert browser.find_elements(By.ID, "chart") == []
        console_errors(browser)  # the refused load is logged: not the page's doing

        # With credentials the page and its requests to the API get through, and the
        # diagnosis says, prominently, why nothing shows.
        browser.get(f"http://viewer:pw@127.0.0.1:{exporter.port}/")
        wait_for(lambda: "updated" in text(browser, "#updated"), timeout=10, message="no render")
        problem = browser.find_element(By.ID, "problem")
        assert problem.is_displayed()
        assert problem.text.startswith("Not connected to the broker")
        assert text(browser, "#connection") == "disconnected"
        assert console_errors(browser) == []
    finally:
        exporter.stop()
