"""The web view in a real browser: Debian's Chromium driven by Playwright, against a
real ``celery worker`` and the view served by ``queuetopia-celery web`` as the README
writes it.

An operator opens the overview, sees the blocked queue, opens it, retries its head and
sees the queue move on (the worker runs the retried job and the one behind it); in a
read-only view the same action is refused and the queue stays blocked. Screenshots of
the main pages go to the test's tmp dir (and to ``QT_WEB_SCREENSHOTS`` when set: that
is how docs/web-*.png are made).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from queuetopia_celery import Job, Queuetopia
from tests.acceptance.test_first_hour import readme_command, substitute
from tests.conftest import REDIS_URL, ROOT, wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

CHROMIUM = os.environ.get("QT_TEST_CHROMIUM", "/usr/bin/chromium")
#: The README's line, run with this test's app and a free port.
README_WEB = (
    "QUEUETOPIA_WEB_PASSWORD=change-me queuetopia-celery -A myapp:mail web --port 8080 --username ops"
)
CREDENTIALS = {"username": "ops", "password": "change-me"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve_web(
    database_url: str, scope: str, celery_queue: str, tmp_path: Path
) -> Iterator[Callable[[str], str]]:
    """Run a shell command line of ``queuetopia-celery web`` on a free port, as the
    test's app (tests.apps.testapp); return the view's base URL once it answers."""
    procs: list[subprocess.Popen[bytes]] = []

    def serve(command: str) -> str:
        port = free_port()
        line = substitute(command, {"myapp:mail": "tests.apps.testapp:qt", "8080": str(port)})
        env = {
            **os.environ,
            "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
            "QT_TEST_SCOPE": scope,
            "QT_TEST_DATABASE_URL": database_url,
            "QT_TEST_BROKER_URL": REDIS_URL,
            "QT_TEST_CELERY_QUEUE": celery_queue,
        }
        with (tmp_path / f"web-{len(procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec env {line}"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}/"

        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / f"web-{len(procs) - 1}.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(url, timeout=2).status_code in (200, 401)
            return False

        wait_for(answers, timeout=60, interval=0.2, message="the web view to answer")
        return url

    yield serve
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: scripts/test.sh installs Debian's chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield chromium
        chromium.close()


def held_queue(qt: Queuetopia, queue: str) -> tuple[Job, Job]:
    """A queue whose head fails its only attempt (on the worker) and holds the queue."""
    head = qt.create_job(
        queue, "work", {"fail_times": 1, "note": "<script>x</script>"}, max_attempts=1, on_exhausted="hold"
    )
    behind = qt.create_job(queue, "work", {})
    wait_for(lambda: qt.get_job(head.id).held, timeout=60, message=f"{queue}'s head to be held")  # type: ignore[union-attr]
    return head, behind


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"web-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("QT_WEB_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def test_an_operator_retries_a_blocked_queue_in_a_real_browser(
    qt: Queuetopia,
    start_worker: Callable[..., Any],
    serve_web: Callable[[str], str],
    browser: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    start_worker(concurrency=1)
    # Queues beside it: one paused, one with a job scheduled later.
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    qt.create_job("mailbox-ada", "work", {}, scheduled_at=later)
    qt.pause_queue("mailbox-ada")
    qt.create_job("reports", "work", {}, scheduled_at=later)
    head, behind = held_queue(qt, "account-42")
    url = serve_web(readme_command(README_WEB))

    context = browser.new_context(http_credentials=CREDENTIALS, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(url)
    row = page.locator('tr.queue-row[data-queue="account-42"]')
    expect(row.locator(".badge.blocked")).to_be_visible()
    expect(page.locator("tr.queue-row").first).to_have_attribute("data-queue", "account-42")  # blocked first
    expect(row).to_contain_text("planned failure 1")
    shot(page, tmp_path, "overview")

    row.get_by_role("link", name="account-42").click()
    expect(page.locator("#queue-name")).to_have_text("account-42")
    expect(page.locator("tr.job-row").first).to_have_attribute("data-job", str(head.id))  # head first
    shot(page, tmp_path, "queue")
    page.locator(f'tr.job-row[data-job="{head.id}"] a').click()
    expect(page.locator("#job-state")).to_have_text("held")
    expect(page.locator("#job-error")).to_contain_text("RuntimeError: planned failure 1")
    expect(page.locator("#params-hidden")).to_be_visible()
    shot(page, tmp_path, "job")

    page.go_back()
    page.locator("#retry-head").click()
    expect(page.locator("#confirm-form")).to_contain_text(f"Retry job #{head.id}")
    shot(page, tmp_path, "confirm")
    page.locator("#confirm").click()
    expect(page.locator("#outcome")).to_contain_text(f"Job {head.id} of queue account-42 is due now")
    shot(page, tmp_path, "done")

    # The worker runs the retried head (it succeeds at attempt 2) and the job behind it.
    page.locator("#back-to-queue").click()

    def moved_on() -> bool:
        page.reload()
        return page.locator("#queue-empty").count() == 1

    wait_for(moved_on, timeout=60, interval=0.5, message="the queue to move on in the page")
    assert qt.get_job(head.id).state.value == "done"  # type: ignore[union-attr]
    assert qt.get_job(behind.id).state.value == "done"  # type: ignore[union-attr]
    expect(page.locator("#recent")).to_contain_text(f"#{behind.id}")
    context.close()


def test_in_a_read_only_view_the_browser_sees_the_blocked_queue_but_cannot_act(
    qt: Queuetopia,
    start_worker: Callable[..., Any],
    serve_web: Callable[[str], str],
    browser: Any,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    start_worker(concurrency=1)
    head, _ = held_queue(qt, "account-7")
    # The README's line without the credentials: read-only.
    url = serve_web(
        readme_command(README_WEB)
        .replace("QUEUETOPIA_WEB_PASSWORD=change-me ", "")
        .replace(" --username ops", "")
    )
    page = browser.new_page()
    page.goto(url)
    expect(page.locator("header .mode")).to_have_text("read-only")
    row = page.locator('tr.queue-row[data-queue="account-7"]')
    expect(row.locator(".badge.blocked")).to_be_visible()
    row.get_by_role("link", name="account-7").click()
    expect(page.locator("#queue-name")).to_have_text("account-7")
    expect(page.locator("#retry-head")).to_have_count(0)  # no buttons
    shot(page, tmp_path, "read-only-queue")

    response = page.goto(f"{url}confirm/retry?job={head.id}")
    assert response is not None and response.status == 403
    expect(page.locator("#message")).to_contain_text("read-only")
    assert qt.get_job(head.id).held  # type: ignore[union-attr]
    page.close()
