"""The web view against real PostgreSQL, through httpx's ASGI transport: pages,
authentication, read-only mode, CSRF, escaping, pagination, actions."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from queuetopia_celery import Job, JobState, Queuetopia
from queuetopia_celery.errors import ConfigurationError
from queuetopia_celery.web import BasicAuth, TokenAuth, queuetopia_web
from queuetopia_celery.web.reads import Reads

SCRIPT = "<script>alert('pwned')</script>"
AUTH = ("ops", "s3cret-pass")
TOKEN = "t" * 24


@pytest.fixture
def web_qt(make_qt: Callable[..., Queuetopia]) -> Queuetopia:
    qt = make_qt(with_performers=False)

    @qt.performer("boom")
    def boom(job: Job) -> None:
        raise RuntimeError(f"failed with {SCRIPT}\nsecond line of the error")

    @qt.performer("ok")
    def ok(job: Job) -> None:
        return None

    return qt


def blocked_queue(qt: Queuetopia, queue: str = "accounts/42") -> Job:
    """A queue whose head failed its only attempt and holds it, with a job behind."""
    head = qt.create_job(queue, "boom", {"email": SCRIPT}, max_attempts=1, on_exhausted="hold")
    qt.create_job(queue, "ok", {"n": 2})
    qt.drain(queue)
    return head


class TestClient:
    """A synchronous client of an ASGI app that keeps its cookies, like a browser
    (Starlette's own TestClient now wants httpx2)."""

    __test__ = False

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cookies = httpx.Cookies()

    def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://testserver", cookies=self.cookies
            ) as http:
                response = await http.request(method, url, **options)
                self.cookies = http.cookies
                return response

        return asyncio.run(send())

    def get(self, url: str, **options: Any) -> httpx.Response:
        return self.request("GET", url, **options)

    def post(self, url: str, **options: Any) -> httpx.Response:
        return self.request("POST", url, **options)


def client(qt: Queuetopia, **options: Any) -> TestClient:
    return TestClient(queuetopia_web(qt, **options))


def csrf_form(page: str) -> dict[str, str]:
    """The hidden fields of the confirmation form."""
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page))


def test_the_overview_shows_a_blocked_queue_first_with_its_error_and_counts(web_qt: Queuetopia) -> None:
    web_qt.create_job("a-calm-queue", "ok", {}, scheduled_at=None)
    head = blocked_queue(web_qt, "z-blocked")
    page = client(web_qt).get("/")
    assert page.status_code == 200
    text = page.text
    assert text.index("z-blocked") < text.index("a-calm-queue")  # blocked first, despite its name
    assert "blocked" in text and f"#{head.id}" in text
    assert 'http-equiv="refresh"' in text
    assert "failed with &lt;script&gt;" in text
    assert "second line" not in text  # the overview shows the error's first line
    assert SCRIPT not in text

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    web_qt.create_job("a-later-queue", "ok", {}, scheduled_at=later)
    view = Reads(web_qt.engine, web_qt.scope).overview(page=1, page_size=50)
    assert {state.value: count for state, count in view.counts.items() if count} == {
        "held": 1,
        "available": 2,
        "scheduled": 1,
    }
    assert (view.queues_open, view.queues_failing, view.queues_paused) == (3, 1, 0)
    assert view.oldest_due is not None and view.oldest_due.queue in ("a-calm-queue", "z-blocked")
    assert [row.queue for row in view.rows] == ["z-blocked", "a-calm-queue", "a-later-queue"]
    assert view.rows[0].blocked
    # The same estimate as the facade's (and the CLI's status).
    assert view.rows[0].blocked_since == web_qt.queue_statuses(queue="z-blocked")[0].blocked_since


def test_a_job_whose_params_and_error_hold_a_script_shows_them_as_text(web_qt: Queuetopia) -> None:
    head = blocked_queue(web_qt)
    hidden = client(web_qt).get(f"/job/{head.id}")
    assert hidden.status_code == 200
    assert SCRIPT not in hidden.text
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in hidden.text  # the error, as text
    assert "second line of the error" in hidden.text  # the full error
    assert 'id="params-hidden"' in hidden.text and "email" not in hidden.text

    assert client(web_qt).get(f"/job/{2**70}").status_code == 404
    shown = client(web_qt, show_params=True).get(f"/job/{head.id}")
    assert SCRIPT not in shown.text
    assert "&#34;email&#34;: &#34;&lt;script&gt;" in shown.text
    assert "default-src 'none'" in shown.headers["content-security-policy"]


def test_the_queue_page_lists_jobs_in_run_order_with_the_head_first(web_qt: Queuetopia) -> None:
    head = blocked_queue(web_qt)
    later = web_qt.create_job("accounts/42", "ok", {"n": 3})
    web_qt.pause_queue("accounts/42")
    page = client(web_qt).get("/queue", params={"name": "accounts/42"})
    assert page.status_code == 200
    ids = [int(i) for i in re.findall(r'class="job-row" data-job="(\d+)"', page.text)]
    assert ids[0] == head.id and ids[-1] == later.id and len(ids) == 3
    assert "paused" in page.text and "held" in page.text


def test_pages_are_paginated(web_qt: Queuetopia) -> None:
    for n in range(7):
        web_qt.create_job(f"q{n}", "ok", {})
    for n in range(5):
        web_qt.create_job("long", "ok", {"n": n})
    web = client(web_qt, page_size=3)
    first = web.get("/").text
    third = web.get("/", params={"page": 3}).text
    assert "page 1 of 3" in first and "page 3 of 3" in third
    assert len(re.findall('class="queue-row"', first)) == 3
    assert len(re.findall('class="queue-row"', third)) == 2
    queue_page = web.get("/queue", params={"name": "long", "page": 2}).text
    assert len(re.findall('class="job-row"', queue_page)) == 2
    assert web.get("/", params={"page": "0"}).status_code == 400
    assert web.get("/", params={"page": "x"}).status_code == 400


def test_without_credentials_the_view_is_read_only(web_qt: Queuetopia) -> None:
    head = blocked_queue(web_qt)
    web = client(web_qt)
    queue_page = web.get("/queue", params={"name": "accounts/42"}).text
    assert "read-only" in queue_page and "Retry head" not in queue_page and "/confirm/" not in queue_page
    assert web.get("/confirm/retry", params={"job": head.id}).status_code == 403
    refused = web.post("/do/retry", data={"job": str(head.id)})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert web_qt.get_job(head.id).held  # type: ignore[union-attr]


def test_basic_auth_guards_pages_and_actions_and_a_retry_wakes_the_queue(web_qt: Queuetopia) -> None:
    head = blocked_queue(web_qt)
    web = client(web_qt, auth=BasicAuth(*AUTH))
    anonymous = web.get("/")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
    assert web.get("/", auth=("ops", "wrong")).status_code == 401
    assert web.get("/", auth=AUTH).status_code == 200

    confirm = web.get("/confirm/retry", params={"job": head.id}, auth=AUTH)
    assert confirm.status_code == 200 and "Retry job" in confirm.text
    done = web.post("/do/retry", data=csrf_form(confirm.text), auth=AUTH)
    assert done.status_code == 200, done.text
    assert f"Job {head.id} of queue accounts/42 is due now" in done.text
    assert web_qt.get_job(head.id).state.value == "retrying"  # type: ignore[union-attr]
    web_qt.drain("accounts/42")  # the retry fails again and holds the queue again
    assert not web.post("/do/retry", data=csrf_form(confirm.text)).is_success  # no credentials


def test_a_post_without_the_csrf_token_or_from_another_site_is_refused(web_qt: Queuetopia) -> None:
    head = blocked_queue(web_qt)
    web = client(web_qt, auth=BasicAuth(*AUTH))
    confirm = web.get("/confirm/abort", params={"job": head.id}, auth=AUTH)
    form = csrf_form(confirm.text)
    no_token = web.post("/do/abort", data={"job": str(head.id), "reason": "x"}, auth=AUTH)
    assert no_token.status_code == 403 and "CSRF" in no_token.text
    forged = {**form, "reason": "x", "csrf_token": form["csrf_token"][:-4] + "abcd"}
    assert web.post("/do/abort", data=forged, auth=AUTH).status_code == 403
    # The token is bound to the cookie: another browser's cookie does not match.
    other = client(web_qt, auth=BasicAuth(*AUTH))
    assert other.post("/do/abort", data={**form, "reason": "x"}, auth=AUTH).status_code == 403
    cross = web.post(
        "/do/abort", data={**form, "reason": "x"}, auth=AUTH, headers={"origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    assert web_qt.get_job(head.id).status == "pending"  # type: ignore[union-attr]

    aborted = web.post("/do/abort", data={**form, "reason": f"gave up {SCRIPT}"}, auth=AUTH)
    assert aborted.status_code == 200, aborted.text
    assert "was aborted" in aborted.text
    job = web_qt.get_job(head.id)
    assert job is not None and job.status == "aborted" and job.abort_reason == f"gave up {SCRIPT}"
    assert SCRIPT not in web.get("/queue?name=accounts/42", auth=AUTH).text


def test_a_token_or_the_host_apps_own_check_authorizes_actions(web_qt: Queuetopia) -> None:
    blocked_queue(web_qt)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    web = client(web_qt, auth=TokenAuth(TOKEN))
    assert web.get("/").status_code == 401
    confirm = web.get("/confirm/pause", params={"queue": "accounts/42"}, headers=bearer)
    done = web.post("/do/pause", data=csrf_form(confirm.text), headers=bearer)
    assert done.status_code == 200 and "is paused" in done.text

    # The host app's check (here: a header its own middleware would set), mounted.
    host = Starlette()
    host.mount(
        "/ops/queues",
        queuetopia_web(
            web_qt, auth=lambda request: request.headers.get("x-user") == "admin", public_reads=True
        ),
    )
    hosted = TestClient(host)
    overview = hosted.get("/ops/queues/")
    assert overview.status_code == 200 and 'href="/ops/queues/queue?name=accounts%2F42"' in overview.text
    assert hosted.get("/ops/queues/confirm/resume", params={"queue": "accounts/42"}).status_code == 403
    confirm = hosted.get(
        "/ops/queues/confirm/resume", params={"queue": "accounts/42"}, headers={"x-user": "admin"}
    )
    assert 'action="/ops/queues/do/resume"' in confirm.text
    resumed = hosted.post("/ops/queues/do/resume", data=csrf_form(confirm.text), headers={"x-user": "admin"})
    assert resumed.status_code == 200 and "was resumed; its queue was woken" in resumed.text


def test_bulk_actions_show_a_dry_run_count_then_report_what_they_did(web_qt: Queuetopia) -> None:
    for queue in ("b1", "b2", "b3"):
        blocked_queue(web_qt, queue)
    web = client(web_qt, auth=BasicAuth(*AUTH))
    confirm = web.get("/confirm/retry-jobs", params={"action": "boom", "state": "held"}, auth=AUTH)
    assert re.search(r'id="preview-count">3<', confirm.text)
    done = web.post("/do/retry-jobs", data=csrf_form(confirm.text), auth=AUTH)
    assert "3 jobs retried in 3 queues" in done.text
    confirm = web.get("/confirm/abort-jobs", params={"queue": "b1"}, auth=AUTH)
    done = web.post("/do/abort-jobs", data={**csrf_form(confirm.text), "reason": "cleanup"}, auth=AUTH)
    assert "2 jobs aborted in 1 queue" in done.text
    bad = web.get("/confirm/retry-jobs", params={"state": "done"}, auth=AUTH)
    assert bad.status_code == 400


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        BasicAuth("ops", "")
    with pytest.raises(ConfigurationError):
        TokenAuth("short")
    assert "s3cret" not in repr(BasicAuth(*AUTH))


def test_the_pages_and_a_retry_work_on_every_backend(backend_url: str) -> None:
    import uuid

    from celery import Celery

    qt = Queuetopia(
        f"web-{uuid.uuid4().hex[:8]}",
        app=Celery("web-backends", broker="memory://", set_as_current=False),
        database_url=backend_url,
        disabled=True,
    )
    qt.migrate()

    @qt.performer("boom")
    def boom(job: Job) -> None:
        raise RuntimeError(SCRIPT)

    @qt.performer("ok")
    def ok(job: Job) -> None:
        return None

    try:
        head = blocked_queue(qt)
        web = client(qt, auth=BasicAuth(*AUTH))
        overview = web.get("/", auth=AUTH)
        assert overview.status_code == 200 and "accounts/42" in overview.text and SCRIPT not in overview.text
        view = Reads(qt.engine, qt.scope).overview(page=1, page_size=50)
        assert view.counts[JobState.HELD] == 1 and view.queues_failing == 1
        assert web.get("/queue", params={"name": "accounts/42"}, auth=AUTH).status_code == 200
        assert web.get(f"/job/{head.id}", auth=AUTH).status_code == 200
        confirm = web.get("/confirm/retry", params={"job": head.id}, auth=AUTH)
        done = web.post("/do/retry", data=csrf_form(confirm.text), auth=AUTH)
        assert done.status_code == 200 and "wakes no worker (disabled): the next scan starts" in done.text
        assert qt.get_job(head.id).state is JobState.RETRYING  # type: ignore[union-attr]
    finally:
        qt.engine.dispose()


def test_the_web_command_refuses_two_kinds_of_credentials() -> None:
    from click.testing import CliRunner

    from queuetopia_celery.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "--database-url",
            "sqlite:///nowhere.db",
            "--scope",
            "s",
            "web",
            "--token",
            TOKEN,
            "--username",
            "u",
        ],
    )
    assert result.exit_code == 2 and "either --username/--password or --token" in result.output
    result = CliRunner().invoke(
        cli, ["--database-url", "sqlite:///x.db", "--scope", "s", "web", "--username", "u"]
    )
    assert result.exit_code == 2 and "go together" in result.output


def test_a_running_job_shows_its_worker_and_lease(web_qt: Queuetopia) -> None:
    job = web_qt.create_job("running-queue", "ok", {})
    # What a worker does when it starts the job (a lease taken, the attempt begun).
    store = web_qt.backend
    store.release_unstarted("running-queue")
    (lease,) = store.kick(["running-queue"], grace=20, locked_by="celery@host-9/4242")
    assert store.start("running-queue", job.id, lease.token, worker="celery@host-9/4242", lease=60)
    web = client(web_qt)
    overview = web.get("/").text
    assert '<span class="badge running">running</span>' in overview
    queue_page = web.get("/queue", params={"name": "running-queue"}).text
    assert "running since" in queue_page and "celery@host-9/4242" in queue_page
    job_page = web.get(f"/job/{job.id}").text
    assert "held by celery@host-9/4242" in job_page and 'id="job-state">running<' in job_page


def test_several_scopes_get_an_index_and_a_view_each(
    web_qt: Queuetopia, make_qt: Callable[..., Queuetopia], scope: str
) -> None:
    other = make_qt(f"{scope}-mail", with_performers=False)
    other.create_job("inbox", "send", {})
    blocked_queue(web_qt)
    web = TestClient(queuetopia_web([web_qt, other], auth=BasicAuth(*AUTH)))
    assert web.get("/").status_code == 401
    index = web.get("/", auth=AUTH).text
    assert f'href="/scope/{web_qt.scope}/"' in index and f'href="/scope/{other.scope}/"' in index
    assert '<span class="badge blocked">1</span>' in index
    mail = web.get(f"/scope/{other.scope}/", auth=AUTH).text
    assert "inbox" in mail and "accounts/42" not in mail and 'href="/"' in mail
    confirm = web.get(f"/scope/{other.scope}/confirm/pause", params={"queue": "inbox"}, auth=AUTH)
    done = web.post(f"/scope/{other.scope}/do/pause", data=csrf_form(confirm.text), auth=AUTH)
    assert "Queue inbox is paused" in done.text
    with pytest.raises(ConfigurationError):
        queuetopia_web([web_qt, web_qt])
