"""The web view's Starlette application: pages, confirmations and actions.

Reading goes through :class:`~queuetopia_celery.web.reads.Reads` (paginated); every
action goes through the facade's operator methods (``retry_job``, ``abort_job``,
``pause_queue``, ``resume_queue``, ``retry_jobs``, ``abort_jobs``), which validate and
wake the queues. Database calls run in Starlette's thread pool.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
import re
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.templating import Jinja2Templates

from ..errors import (
    ConfigurationError,
    InvalidJobError,
    JobNotFoundError,
    QueueNotFoundError,
    QueuetopiaError,
)
from ..jobs import BulkResult, Job, JobState, first_line, utcnow, validate_name
from .auth import Authorize, BasicAuth, TokenAuth
from .csrf import COOKIE, FIELD, Csrf, cross_site
from .reads import OPEN_STATES, Reads

if TYPE_CHECKING:
    from ..app import Queuetopia

#: Job states an operator may give the bulk retry (the facade's default is all three).
RETRY_STATES = (JobState.RETRYING, JobState.HELD, JobState.EXHAUSTED)
OPERATIONS = ("retry", "abort", "pause", "resume", "retry-jobs", "abort-jobs")
MAX_PAGE_SIZE = 500


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the view behaves (see :func:`queuetopia_celery.web.queuetopia_web`)."""

    auth: Authorize | None = None
    public_reads: bool = False
    show_params: bool = False
    page_size: int = 50
    refresh: int = 10
    secret_key: bytes = dataclasses.field(default=b"", repr=False)
    title: str = "queuetopia"
    #: Mounted under the index of several scopes (``/scope/<name>``): link back to it.
    under_index: bool = False


class Refused(Exception):
    """A request the view will not serve: status, message, optional challenge."""

    def __init__(self, status: int, message: str, challenge: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.challenge = challenge


class WebView:
    def __init__(self, qt: Queuetopia, settings: Settings) -> None:
        self.qt = qt
        self.settings = settings
        self.reads = Reads(qt.engine, qt.scope)
        self.csrf = Csrf(settings.secret_key or secrets.token_bytes(32))
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("queuetopia_celery.web", "templates"),
            autoescape=True,
        )
        env.filters["ago"] = ago
        env.filters["when"] = when
        env.filters["first_line"] = lambda text: first_line(text) if text else ""
        self.templates = Jinja2Templates(env=env)

    # ------------------------------------------------------------------ plumbing

    @property
    def read_only(self) -> bool:
        return self.settings.auth is None

    async def _authorized(self, request: Request) -> bool:
        auth = self.settings.auth
        if auth is None:
            return False
        verdict = auth(request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    def _refuse_unauthorized(self) -> Refused:
        auth = self.settings.auth
        challenge = auth.challenge if isinstance(auth, (BasicAuth, TokenAuth)) else None
        if challenge:
            return Refused(401, "authentication required", challenge)
        return Refused(403, "not allowed")

    async def _check_read(self, request: Request) -> None:
        needed = self.settings.auth is not None and not self.settings.public_reads
        if needed and not await self._authorized(request):
            raise self._refuse_unauthorized()

    async def _check_act(self, request: Request) -> None:
        if self.read_only:
            raise Refused(403, "read-only: no credentials are configured, so actions are refused")
        if not await self._authorized(request):
            raise self._refuse_unauthorized()

    def _render(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        root = request.scope.get("root_path", "")
        context = {
            "request": request,
            "title": self.settings.title,
            "scope": self.qt.scope,
            "can_act": not self.read_only,
            "read_only": self.read_only,
            "link": lambda route, /, **query: _link(request, route, **query),
            "index": root.rsplit("/scope/", 1)[0] + "/" if self.settings.under_index else None,
            **context,
        }
        response = self.templates.TemplateResponse(request, template, context, status_code=status)
        _secure(response)
        return response

    def _refused_page(self, request: Request, refused: Refused) -> Response:
        response = self._render(
            request, "message.html", refused.status, heading="Refused", message=refused.message
        )
        if refused.challenge:
            response.headers["WWW-Authenticate"] = refused.challenge
        return response

    def _page(self, request: Request) -> int:
        return _positive_int(request.query_params.get("page"), default=1, name="page")

    def _page_size(self, request: Request) -> int:
        size = _positive_int(request.query_params.get("size"), default=self.settings.page_size, name="size")
        return min(size, MAX_PAGE_SIZE)

    # ------------------------------------------------------------------ pages

    async def overview(self, request: Request) -> Response:
        try:
            await self._check_read(request)
            page, size = self._page(request), self._page_size(request)
        except Refused as refused:
            return self._refused_page(request, refused)
        view = await run_in_threadpool(self.reads.overview, page=page, page_size=size)
        return self._render(
            request,
            "overview.html",
            view=view,
            states=OPEN_STATES,
            refresh=self.settings.refresh,
            retry_states=RETRY_STATES,
        )

    async def queue(self, request: Request) -> Response:
        try:
            await self._check_read(request)
            name = _name("queue", request.query_params.get("name"))
            page, size = self._page(request), self._page_size(request)
        except Refused as refused:
            return self._refused_page(request, refused)
        view = await run_in_threadpool(self.reads.queue, name, page=page, page_size=size)
        explanation = await run_in_threadpool(_explain, self.qt, name)
        return self._render(
            request, "queue.html", view=view, explanation=explanation, refresh=self.settings.refresh
        )

    async def job(self, request: Request) -> Response:
        try:
            await self._check_read(request)
        except Refused as refused:
            return self._refused_page(request, refused)
        job_id: int = request.path_params["job_id"]
        job = await run_in_threadpool(self.qt.get_job, job_id) if 0 < job_id < 2**63 else None
        if job is None:
            return self._render(
                request,
                "message.html",
                404,
                heading="No such job",
                message=f"no job {job_id} in scope {self.qt.scope}",
            )
        lease = await run_in_threadpool(self.reads.lease_of, job.queue)
        return self._render(
            request,
            "job.html",
            job=job,
            state=job.state,
            lease=lease if lease is not None and lease.job_id == job.id else None,
            params=_json(job.params) if self.settings.show_params else None,
            result=_json(job.result) if self.settings.show_params else None,
            show_params=self.settings.show_params,
            now=utcnow(),
            refresh=self.settings.refresh,
        )

    # ------------------------------------------------------------------ actions

    async def confirm(self, request: Request) -> Response:
        """The confirmation form of an action (with a dry-run count for bulk ones)."""
        try:
            await self._check_act(request)
            op = _operation(request.path_params["op"])
            target = _target(op, dict(request.query_params))
        except Refused as refused:
            return self._refused_page(request, refused)
        preview: BulkResult | None = None
        job: Job | None = None
        try:
            if op in ("retry", "abort"):
                job = await run_in_threadpool(self.qt.get_job, int(target["job"]))
                if job is None:
                    raise JobNotFoundError(self.qt.scope, int(target["job"]))
            elif op in ("retry-jobs", "abort-jobs"):
                preview = await run_in_threadpool(_bulk, self.qt, op, target, True)
        except QueuetopiaError as exc:
            return self._render(
                request, "message.html", _status_of(exc), heading="Cannot do that", message=str(exc)
            )
        nonce = request.cookies.get(COOKIE) or Csrf.new_nonce()
        response = self._render(
            request,
            "confirm.html",
            op=op,
            target=target,
            job=job,
            preview=preview,
            csrf_field=FIELD,
            csrf_token=self.csrf.token(nonce, _credentials(request)),
        )
        response.set_cookie(
            COOKIE,
            nonce,
            path=request.scope.get("root_path") or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def act(self, request: Request) -> Response:
        try:
            await self._check_act(request)
            if cross_site(request.headers):
                raise Refused(403, "cross-site request refused")
            form = await request.form()
            fields = {key: value for key, value in form.items() if isinstance(value, str)}
            if not self.csrf.valid(request.cookies.get(COOKIE), fields.get(FIELD), _credentials(request)):
                raise Refused(403, _CSRF_FAILED)
            op = _operation(request.path_params["op"])
            target = _target(op, fields)
        except Refused as refused:
            return self._refused_page(request, refused)
        try:
            done = await run_in_threadpool(_perform, self.qt, op, target)
        except QueuetopiaError as exc:
            return self._render(
                request, "message.html", _status_of(exc), heading="Not done", message=str(exc)
            )
        return self._render(
            request, "done.html", heading="Done", message=done.message, target=target, queue=done.queue
        )


# ---------------------------------------------------------------------- helpers

_CSRF_FAILED = "the form has expired or did not come from this page (CSRF check failed): reload it, try again"


def _explain(qt: Queuetopia, queue: str) -> str | None:
    try:
        return qt.explain_queue(queue).summary
    except QueueNotFoundError:
        return None


def _operation(op: str) -> str:
    if op not in OPERATIONS:
        raise Refused(404, f"no such action: {op!r}")
    return op


def _name(field: str, value: str | None) -> str:
    try:
        return validate_name(field, value)
    except InvalidJobError as exc:
        raise Refused(400, str(exc)) from exc


def _positive_int(text: str | None, *, default: int, name: str) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or int(text) < 1 or len(text) > 9:
        raise Refused(400, f"{name} must be a whole number >= 1")
    return int(text)


def _target(op: str, fields: dict[str, str]) -> dict[str, str]:
    """The action's arguments, checked: a job id, a queue, or a bulk filter."""
    if op in ("retry", "abort"):
        target = {"job": str(_positive_int(fields.get("job"), default=0, name="job"))}
        if target["job"] == "0":
            raise Refused(400, "job is required")
        if op == "retry" and fields.get("force") == "1":
            target["force"] = "1"
    elif op in ("pause", "resume"):
        target = {"queue": _name("queue", fields.get("queue"))}
    else:
        target = {}
        for field in ("queue", "action"):
            value = (fields.get(field) or "").strip()
            if value:
                target[field] = _name(field, value)
        state = (fields.get("state") or "").strip()
        if op == "retry-jobs" and state:
            if state not in {s.value for s in RETRY_STATES}:
                raise Refused(400, f"state must be one of {', '.join(s.value for s in RETRY_STATES)}")
            target["state"] = state
        if op == "retry-jobs" and fields.get("force") == "1":
            target["force"] = "1"
    if op in ("abort", "abort-jobs") and "reason" in fields:
        target["reason"] = fields["reason"]
    return target


def _bulk(qt: Queuetopia, op: str, target: dict[str, str], dry_run: bool) -> BulkResult:
    scope_wide = "queue" not in target and "action" not in target
    if op == "retry-jobs":
        return qt.retry_jobs(
            queue=target.get("queue"),
            action=target.get("action"),
            state=target.get("state") or None,
            force="force" in target,
            all=scope_wide,
            dry_run=dry_run,
        )
    return qt.abort_jobs(
        reason=target.get("reason") or "(dry run)",
        queue=target.get("queue"),
        action=target.get("action"),
        all=scope_wide,
        dry_run=dry_run,
    )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What an action did, in one sentence, and the queue it touched (if one)."""

    message: str
    queue: str | None = None


def _perform(qt: Queuetopia, op: str, target: dict[str, str]) -> Outcome:
    """Do the action through the facade and say what was done."""
    if op == "retry":
        job = qt.retry_job(int(target["job"]), force="force" in target)
        return Outcome(f"Job {job.id} of queue {job.queue} is due now; {_woken(qt)}", job.queue)
    if op == "abort":
        job = qt.abort_job(int(target["job"]), target.get("reason", ""))
        return Outcome(f"Job {job.id} of queue {job.queue} was aborted; its queue moves on.", job.queue)
    queue = target.get("queue")
    if op == "pause":
        changed = qt.pause_queue(target["queue"])
        said = "is paused." if changed else "was already paused: nothing changed."
        return Outcome(f"Queue {queue} {said}", queue)
    if op == "resume":
        changed = qt.resume_queue(target["queue"])
        said = f"was resumed; {_woken(qt)}" if changed else "was not paused: nothing changed."
        return Outcome(f"Queue {queue} {said}", queue)
    result = _bulk(qt, op, target, False)
    verb = "retried" if op == "retry-jobs" else "aborted"
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(result.skipped.items()))
    jobs = f"{result.count} job{'s' if result.count != 1 else ''}"
    queues = f"{len(result.queues)} queue{'s' if len(result.queues) != 1 else ''}"
    return Outcome(f"{jobs} {verb} in {queues}" + (f"; skipped: {skipped}" if skipped else "") + ".", queue)


def _woken(qt: Queuetopia) -> str:
    if qt.disabled:
        return "this Queuetopia wakes no worker (disabled): the next scan starts the queue."
    return "its queue was woken."


def _status_of(exc: QueuetopiaError) -> int:
    if isinstance(exc, (JobNotFoundError, QueueNotFoundError)):
        return 404
    if isinstance(exc, InvalidJobError):
        return 400
    return 409


def _credentials(request: Request) -> str:
    return request.headers.get("authorization", "")


#: The path parameters of each route; other arguments of ``link`` go to the query string.
_PATH_PARAMS = {"job": ("job_id",), "confirm": ("op",), "do": ("op",)}


def _link(request: Request, route: str, /, **query: object) -> str:
    """The path of ``route`` (under the mount point) with its query string."""
    keys = _PATH_PARAMS.get(route, ())
    path_params = {key: query.pop(key) for key in keys}
    params = {key: str(value) for key, value in query.items() if value is not None}
    url = request.url_for(route, **path_params).path
    return url + ("?" + urlencode(params) if params else "")


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _secure(response: Response) -> None:
    headers = response.headers
    headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    headers["X-Frame-Options"] = "DENY"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "same-origin"
    headers["Cache-Control"] = "no-store"


def ago(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """``3 min ago``, ``in 20 s``: a duration a person reads at a glance."""
    if value is None:
        return "-"
    seconds = ((now or utcnow()) - value).total_seconds()
    if value.year >= 9999:
        return "never (held)"
    text = _span(abs(seconds))
    return f"{text} ago" if seconds >= 0 else f"in {text}"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}" if seconds < 10 * size else f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def build(qt: Queuetopia, settings: Settings) -> Starlette:
    view = WebView(qt, settings)
    routes = [
        Route("/", view.overview, name="overview"),
        Route("/queue", view.queue, name="queue"),
        Route("/job/{job_id:int}", view.job, name="job"),
        Route("/confirm/{op}", view.confirm, name="confirm"),
        Route("/do/{op}", view.act, methods=["POST"], name="do"),
    ]
    app = Starlette(routes=routes)
    app.state.queuetopia_view = view
    return app


class ScopesIndex:
    """The index of several scopes: each one's queues, blocked queues and open jobs."""

    def __init__(self, views: list[WebView]) -> None:
        self.views = views

    async def index(self, request: Request) -> Response:
        first = self.views[0]
        try:
            await first._check_read(request)
        except Refused as refused:
            return first._refused_page(request, refused)
        rows = []
        for view in self.views:
            summary = await run_in_threadpool(view.reads.overview, page=1, page_size=1)
            rows.append((view.qt.scope, summary))
        root = request.scope.get("root_path", "")
        return first._render(
            request,
            "scopes.html",
            rows=rows,
            scope="all scopes",
            index=None,
            scope_url=lambda scope: f"{root}/scope/{quote(scope, safe='')}/",
            refresh=first.settings.refresh,
        )


def build_index(qts: Sequence[Queuetopia], settings: Settings) -> Starlette:
    """One view per Queuetopia under ``/scope/<scope>/``, and their index at ``/``."""
    scopes = [qt.scope for qt in qts]
    if not qts or len(set(scopes)) != len(scopes):
        raise ConfigurationError("give one or more Queuetopias of different scopes")
    if any(not _PLAIN_SCOPE.fullmatch(scope) for scope in scopes):
        raise ConfigurationError(
            "with several scopes, each scope name must be letters, digits, '.', '_' or '-'"
        )
    nested = dataclasses.replace(settings, under_index=True)
    apps = [build(qt, nested) for qt in qts]
    index = ScopesIndex([app.state.queuetopia_view for app in apps])
    routes: list[BaseRoute] = [Route("/", index.index, name="scopes")]
    routes += [Mount(f"/scope/{qt.scope}", app=app) for qt, app in zip(qts, apps, strict=True)]
    return Starlette(routes=routes)


_PLAIN_SCOPE = re.compile(r"[A-Za-z0-9._-]+")

__all__ = ["Settings", "ago", "build", "build_index"]
