"""Task lookups, grouped failures and the 15-minute charts, in headless Chromium, against a
real worker whose result backend (Redis, with extended results) says what really happened."""

from __future__ import annotations

import pytest
from celery.result import AsyncResult
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from exporter.web.overview import quantile
from tests.celery_app import HOSTILE_NAME, make_app
from tests.harness import InProcessExporter, parse, scrape
from tests.servers import RedisServer, wait_for
from tests.test_overview_page import browser, console_errors, exporter, text
from tests.workers import CeleryWorker, WorkerFactory

RESULT_DB = 1
__all__ = ["browser", "exporter"]  # the page tests' fixtures, shared


@pytest.fixture
def worker(clean_redis: RedisServer, worker_factory: WorkerFactory) -> CeleryWorker:
    return worker_factory(
        clean_redis.url, env={"TEST_RESULT_BACKEND": clean_redis.url_for(RESULT_DB)}
    )


def wait_counted(exporter: InProcessExporter, metric: str, count: int) -> None:
    wait_for(
        lambda: exporter.total(metric) == count,
        timeout=60,
        message=lambda: f"{metric} is {exporter.total(metric)}, not {count}",
    )


def look_up(driver: WebDriver, text_typed: str, uuid: str) -> dict[str, str]:
    """Type into the search box, submit, and read the task shown: its details by field,
    and its timeline's steps."""
    box = driver.find_element(By.ID, "lookup-id")
    box.clear()
    box.send_keys(text_typed)
    driver.find_element(By.CSS_SELECTOR, "#lookup-form button").click()
    wait_for(
        lambda: (
            driver.find_element(By.ID, "lookup-result").is_displayed()
            and uuid in text(driver, "#lookup-title")
        ),
        timeout=10,
        message=lambda: f"{uuid} not shown: {text(driver, '#lookup-note')!r}",
    )
    shown: dict[str, str] = driver.execute_script(
        "const shown = {};"
        "for (const cell of document.querySelectorAll('#lookup-details dd'))"
        "  shown[cell.dataset.field] = cell.textContent;"
        "shown.steps = [...document.querySelectorAll('#timeline li')]"
        "  .map((item) => item.dataset.step).join(' ');"
        "shown.title = document.getElementById('lookup-title').textContent;"
        "shown.traceback = document.querySelector('#lookup-traceback pre').textContent;"
        "return shown;"
    )
    return shown


def milliseconds(seconds: float) -> str:
    """A run time under a second as the page writes it: three significant digits."""
    return f"{seconds * 1000:.3g} ms"


def test_a_task_id_typed_in_shows_its_life_as_the_result_backend_tells_it(
    browser: WebDriver,
    clean_redis: RedisServer,
    exporter: InProcessExporter,
    worker: CeleryWorker,
) -> None:
    app = make_app(clean_redis.url, result_backend=clean_redis.url_for(RESULT_DB))
    slept = app.send_task("tests.sleep", (0.2,))
    failed = app.send_task("tests.fail", ("boom",))
    retried = app.send_task("tests.retry_then_succeed", (2,))
    hostile = app.send_task(HOSTILE_NAME)
    for result in (slept, failed, retried, hostile):
        result.get(timeout=60, propagate=False)
    wait_counted(exporter, "celery_task_succeeded_total", 2)
    wait_counted(exporter, "celery_task_failed_total", 2)
    browser.get(exporter.url + "/")
    wait_for(lambda: "updated" in text(browser, "#updated"), timeout=10, message="no render")

    def record(result: AsyncResult) -> dict:
        return exporter.daemon.tasks.find(result.id)  # type: ignore[union-attr]

    for result, state in ((slept, "succeeded"), (failed, "failed"), (retried, "succeeded")):
        assert result.state == {"succeeded": "SUCCESS", "failed": "FAILURE"}[state]
        shown = look_up(browser, result.id, result.id)
        assert shown["state"] == state
        assert shown["worker"] == result.worker == worker.hostname
        assert shown["retries"] == str(result.retries)
        # The backend stores the result when the task ends: the record's end is that moment.
        assert abs(record(result)["ended"] - result.date_done.timestamp()) < 1.0
    assert retried.retries == 2
    # The timeline holds the latest execution and the latest retry before it.
    steps = shown["steps"].split()
    assert (steps[0], steps[-2:]) == ("sent", ["started", "succeeded"]) and "retried" in steps

    # The run time: what the worker measured (tests.sleep slept 0.2 s of it).
    runtime = record(slept)["runtime"]
    assert 0.2 <= runtime < 1.0
    assert look_up(browser, slept.id, slept.id)["run time"] == milliseconds(runtime)

    # The failure: its exception, and the traceback the backend has too.
    shown = look_up(browser, failed.id, failed.id)
    assert shown["exception"] == "ValueError 'boom'"
    assert shown["steps"] == "sent received started failed"
    assert failed.traceback.strip().splitlines()[-1] == "ValueError: boom"
    assert shown["traceback"].strip().splitlines()[-1] == "ValueError: boom"
    failed_record = record(failed)
    assert shown["run time"] == milliseconds(failed_record["ended"] - failed_record["started"])

    # The first characters of an id find the task too; a name that is markup stays text.
    shown = look_up(browser, hostile.id[:8], hostile.id)
    assert shown["title"] == f"{HOSTILE_NAME} · {hostile.id}"
    assert browser.execute_script("return window.owned") is None
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1

    # An id nobody sent: said so, nothing shown.
    box = browser.find_element(By.ID, "lookup-id")
    box.clear()
    box.send_keys("no-such-task")
    browser.find_element(By.CSS_SELECTOR, "#lookup-form button").click()
    wait_for(lambda: "No task with this id" in text(browser, "#lookup-note"), timeout=10)
    assert not browser.find_element(By.ID, "lookup-result").is_displayed()

    # The recent tasks, newest first, filtered by state and by name.
    def recent() -> list[list[str]]:
        return browser.execute_script(
            "return [...document.querySelectorAll('#recent-tasks tbody tr')]"
            ".map((row) => [...row.cells].map((cell) => cell.textContent))"
        )

    wait_for(lambda: len(recent()) == 4, timeout=15, message=lambda: str(recent()))
    assert {row[2] for row in recent()} == {slept.id, failed.id, retried.id, hostile.id}
    browser.find_element(By.CSS_SELECTOR, "#recent-state option[value='']")
    browser.execute_script(
        "const state = document.getElementById('recent-state'); state.value = 'failed';"
        "state.dispatchEvent(new Event('input'));"
    )
    wait_for(lambda: len(recent()) == 2, timeout=10, message=lambda: str(recent()))
    assert {(row[0], row[1]) for row in recent()} == {
        ("tests.fail", "failed"),
        (HOSTILE_NAME, "failed"),
    }
    browser.find_element(By.ID, "recent-name").send_keys("tests.f")
    wait_for(lambda: len(recent()) == 1, timeout=10, message=lambda: str(recent()))
    assert recent()[0][:3] == ["tests.fail", "failed", failed.id]
    assert console_errors(browser) == []


def _bucket_totals(metrics: str, family: str) -> tuple[list[float], list[float]]:
    """A histogram's bounds and its per-bucket counts summed over all series, from /metrics."""
    cumulative: dict[float, float] = {}
    for (sample, labels), value in parse(metrics).items():
        if sample == f"{family}_bucket":
            bound = float(dict(labels)["le"])
            cumulative[bound] = cumulative.get(bound, 0.0) + value
    bounds = sorted(cumulative)
    counts, below = [], 0.0
    for bound in bounds:
        counts.append(cumulative[bound] - below)
        below = cumulative[bound]
    return bounds[:-1], counts


def window(driver: WebDriver) -> dict[str, str]:
    return driver.execute_script(
        "const shown = {}; const cells = [...document.querySelectorAll('#window-figures > *')];"
        "for (let i = 0; i < cells.length; i += 2) shown[cells[i].textContent] ="
        " cells[i + 1].textContent; return shown;"
    )


def canvas(driver: WebDriver, canvas_id: str) -> tuple[int, int, str]:
    """Points drawn, pixels painted, and the picture itself, of one chart."""
    return tuple(
        driver.execute_script(
            "const canvas = document.getElementById(arguments[0]);"
            "const pixels = canvas.getContext('2d')"
            "  .getImageData(0, 0, canvas.width, canvas.height).data;"
            "let painted = 0; for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;"
            "return [Number(canvas.dataset.points || 0), painted, canvas.toDataURL()];",
            canvas_id,
        )
    )


def test_failures_grouped_percentiles_of_the_window_and_charts_that_move(
    browser: WebDriver,
    clean_redis: RedisServer,
    exporter: InProcessExporter,
    worker_factory: WorkerFactory,
) -> None:
    worker_factory(clean_redis.url)
    app = make_app(clean_redis.url)
    for index in range(12):
        app.send_task("tests.fail", (f"boom {index}",))
    for _ in range(8):
        app.send_task("tests.fail_key")
    for index in range(10):
        app.send_task("tests.sleep", (0.01 * index,))
    wait_counted(exporter, "celery_task_failed_total", 20)
    wait_counted(exporter, "celery_task_succeeded_total", 10)
    browser.get(exporter.url + "/")

    def groups() -> list[list[str]]:
        return browser.execute_script(
            "return [...document.querySelectorAll('#failures li[data-uuid]')].map((item) => ["
            "item.querySelector('.count').textContent,"
            "item.querySelector('.exception').textContent,"
            "item.querySelector('.where').textContent.split(' · ')[0]])"
        )

    wait_for(lambda: len(groups()) == 2, timeout=15, message=lambda: str(groups()))
    assert groups() == [["12", "ValueError", "tests.fail"], ["8", "KeyError", "tests.fail_key"]]
    assert "KeyError: 'missing'" in browser.execute_script(
        "return document.querySelectorAll('#failures li pre')[1].textContent"
    )

    # Once the history has sampled after the last task, the page's run time and queue
    # wait percentiles are those of the histograms' buckets: all of them fall in the window.
    sampled = exporter.daemon.overview.history.timings
    done = exporter.daemon.health.last_event_at

    def sampled_since_done() -> bool:
        return bool(sampled) and sampled[-1][0] > done

    wait_for(sampled_since_done, timeout=20, message="no sample after the last task")
    metrics = scrape(exporter.url)

    def page_shows_the_histograms() -> bool:
        shown = window(browser)
        for label, family in (
            ("run time", "celery_task_runtime_seconds"),
            ("queue wait", "celery_task_queue_wait_seconds"),
        ):
            bounds, counts = _bucket_totals(metrics, family)
            for q in (0.5, 0.95):
                seconds = quantile(q, bounds, counts)
                assert seconds is not None
                expected = browser.execute_script(
                    "const v = arguments[0]; return v < 1 ? (v * 1000).toPrecision(3)"
                    ".replace(/\\.?0+$/, '') + ' ms' : v.toFixed(2) + ' s';",
                    seconds,
                )
                if shown.get(f"{label} p{round(q * 100)}") != expected:
                    return False
        return shown.get("tasks timed") == "10"

    wait_for(page_shows_the_histograms, timeout=15, message=lambda: str(window(browser)))

    # Three charts on canvas, drawn, and moving as the 10-second samples come.
    charts = ("chart-runtime", "chart-queue-wait", "chart-backlog")
    wait_for(lambda: all(canvas(browser, c)[0] >= 1 for c in charts), timeout=20)
    before = {chart: canvas(browser, chart) for chart in charts}
    assert all(painted > 100 for _, painted, _ in before.values())
    for _ in range(5):
        app.send_task("tests.sleep", (0.3,))
    wait_counted(exporter, "celery_task_succeeded_total", 15)
    wait_for(
        lambda: (
            all(canvas(browser, chart)[0] > before[chart][0] for chart in charts)
            and all(canvas(browser, chart)[2] != before[chart][2] for chart in charts)
        ),
        timeout=40,
        message=lambda: str({chart: canvas(browser, chart)[:2] for chart in charts}),
    )
    latest = browser.execute_script(
        "return document.getElementById('chart-runtime').dataset.latest"
    )
    assert float(latest) > 0.1  # the 0.3 s tasks' interval
    assert console_errors(browser) == []
