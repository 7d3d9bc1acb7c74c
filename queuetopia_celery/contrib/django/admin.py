"""The admin: jobs read-only, with filters, search, the full error, and the actions
retry and abort (through the library's own operations, which wake the queue)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from queuetopia_celery.errors import QueuetopiaError
from queuetopia_celery.jobs import HELD_UNTIL, JobState

from .models import Job
from .queuetopia import load_queuetopias


class StateFilter(admin.SimpleListFilter):  # type: ignore[misc]
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(state.value, state.value) for state in JobState]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        value = self.value()
        if not value:
            return queryset
        now = timezone.now()
        pending = Q(status="pending")
        not_held = Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lt=HELD_UNTIL)
        by_state = {
            "done": Q(status="done"),
            "exhausted": Q(status="exhausted"),
            "aborted": Q(status="aborted"),
            "running": Q(status="running"),
            "held": pending & Q(next_attempt_at__gte=HELD_UNTIL),
            "retrying": pending & not_held & Q(attempts__gt=0),
            "scheduled": pending & not_held & Q(attempts=0, scheduled_at__gt=now),
            "available": pending & not_held & Q(attempts=0, scheduled_at__lte=now),
        }
        return queryset.filter(by_state[value]) if value in by_state else queryset.none()


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):  # type: ignore[misc]
    list_display = (
        "id",
        "scope",
        "queue",
        "sequence",
        "action",
        "state",
        "attempts",
        "inserted_at",
        "done_at",
    )
    list_filter = ("scope", StateFilter, "action", "queue")
    search_fields = ("=id", "queue")
    actions = ("retry_jobs", "abort_jobs")
    readonly_fields = ("state",)
    list_per_page = 50

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Job], search_term: str) -> Any:
        # "=id" with a non-numeric term would be a database error: search queues only then.
        if not search_term.strip().isdigit():
            return queryset.filter(queue__icontains=search_term.strip()), False
        return super().get_search_results(request, queryset, search_term)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # The change page is the job's read-only page; no write goes through the form.
        return bool(request.method in ("GET", "HEAD") and super().has_view_permission(request, obj))

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions: dict[str, Any] = super().get_actions(request)
        if not request.user.has_perm("queuetopia.change_job"):
            actions.pop("retry_jobs", None)
            actions.pop("abort_jobs", None)
        return actions

    def _operate(self, request: HttpRequest, queryset: QuerySet[Job], verb: str) -> None:
        built = load_queuetopias()
        done = 0
        for job in queryset.order_by("id"):
            qt = built.get(job.scope)
            if qt is None:
                self.message_user(
                    request,
                    f"job {job.id}: no Queuetopia of scope {job.scope!r} in this project",
                    messages.ERROR,
                )
                continue
            try:
                if verb == "retry":
                    qt.retry_job(job.id)
                else:
                    qt.abort_job(job.id, f"aborted in the admin by {request.user.get_username()}")
            except QueuetopiaError as exc:
                self.message_user(request, f"job {job.id}: {exc}", messages.ERROR)
            else:
                done += 1
        if done:
            self.message_user(request, f"{verb}: {done} job(s)", messages.SUCCESS)

    @admin.action(description="Retry the selected jobs now (retrying, held, exhausted, scheduled)")  # type: ignore[untyped-decorator]
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._operate(request, queryset, "retry")

    @admin.action(description="Abort the selected jobs (their queues move on)")  # type: ignore[untyped-decorator]
    def abort_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._operate(request, queryset, "abort")
