"""The Django integration in a real Django project (tests/djangoproject) with a real
``celery worker`` of that project, on PostgreSQL: a view saves a model and creates a
job in one ``transaction.atomic()`` block."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction
from django.test import Client

from tests.conftest import REDIS_URL, Proc

pytestmark = [pytest.mark.acceptance, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def project(django_db_setup: None) -> Iterator[object]:
    from tests.djangoproject import celery_app

    yield celery_app
    # The producer's own pool holds connections to the test database: give them back
    # before pytest-django drops it.
    celery_app.shop.engine.dispose()


@pytest.fixture(scope="module")
def django_worker(
    django_db_setup: None,
    django_db_blocker: object,
    project: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proc]:
    """One ``celery -A tests.djangoproject.celery_app worker`` (one process, so that
    consecutive jobs share its ORM connection) on the test database."""
    tmp = tmp_path_factory.mktemp("django-worker")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.djangoproject.settings",
        "QT_TEST_BROKER_URL": REDIS_URL,
        "QT_TEST_READY_FILE": str(tmp / "ready"),
    }
    args = [
        sys.executable, "-m", "celery", "-A", "tests.djangoproject.celery_app", "worker",
        "-P", "prefork", "-c", "1", "-Q", os.environ["QT_DJANGO_CELERY_QUEUE"],
        "-n", f"django-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    proc = Proc(args, env, tmp / "worker.log", tmp / "ready")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _messages(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def _customer() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def test_a_rolled_back_view_leaves_neither_the_order_nor_the_job_nor_a_wakeup(project: object) -> None:
    from tests.acceptance.test_fastapi import broker_messages
    from tests.djangoproject.celery_app import shop
    from tests.djangoproject.shop.models import Order

    customer = _customer()
    before = broker_messages(os.environ["QT_DJANGO_CELERY_QUEUE"])  # other tests' leftovers
    response = Client().post("/orders/", {"customer": customer, "item": "book", "fail": "1"})
    assert response.status_code == 409
    assert not Order.objects.filter(customer=customer).exists()
    assert shop.list_jobs(queue=f"customer-{customer}") == []
    # Nor a wake-up: no message was published (no worker runs yet in this module).
    assert broker_messages(os.environ["QT_DJANGO_CELERY_QUEUE"]) == before


def test_jobs_of_committed_views_run_in_order_on_the_worker(django_worker: Proc) -> None:
    from tests.djangoproject.celery_app import shop
    from tests.djangoproject.shop.models import Shipment

    customer = _customer()
    client = Client()
    orders = []
    for n in range(5):
        response = client.post("/orders/", {"customer": customer, "item": f"item-{n}"})
        assert response.status_code == 200, response.content
        orders.append(response.json())
    # The refused one in the middle never runs.
    assert client.post("/orders/", {"customer": customer, "item": "x", "fail": "1"}).status_code == 409

    for order in orders:
        job = shop.wait(order["job"], timeout=60)
        assert job.status == "done", job.error
    shipped = list(
        Shipment.objects.filter(customer=customer).order_by("id").values_list("order_id", flat=True)
    )
    assert shipped == [order["order"] for order in orders]
    assert len(shop.list_jobs(queue=f"customer-{customer}")) == 5


def test_a_job_created_in_an_atomic_block_waits_for_the_commit(django_worker: Proc) -> None:
    """While the block is open the job is invisible to the worker (no DoesNotExist
    there); on commit it is woken and runs."""
    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order, Shipment

    customer = _customer()
    with transaction.atomic():
        order = Order.objects.create(customer=customer, item="book")
        job = ship.delay(customer=customer, order_id=order.id)
        assert shop.get_job(job.id) is None  # another connection: not committed yet
    assert shop.wait(job, timeout=60).status == "done"
    assert Shipment.objects.get(customer=customer).order_id == order.id


def test_a_job_in_a_rolled_back_savepoint_is_gone_and_the_outer_blocks_job_kept(project: object) -> None:
    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order
    from tests.djangoproject.shop.views import Refused

    customer = _customer()
    with transaction.atomic():
        order = Order.objects.create(customer=customer, item="book")
        try:
            with transaction.atomic():  # a savepoint
                dropped = ship.delay(customer=customer, order_id=order.id)
                raise Refused
        except Refused:
            pass
        kept = ship.delay(customer=customer, order_id=order.id)
    assert shop.get_job(dropped.id) is None
    assert [job.id for job in shop.list_jobs(queue=f"customer-{customer}")] == [kept.id]


def test_outside_an_atomic_block_the_job_commits_at_once(django_worker: Proc) -> None:
    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order

    customer = _customer()
    order = Order.objects.create(customer=customer, item="book")
    job = ship.delay(customer=customer, order_id=order.id)
    assert shop.get_job(job.id) is not None
    assert shop.wait(job, timeout=60).status == "done"


def test_bulk_jobs_join_the_atomic_block_and_run_in_order_after_its_commit(django_worker: Proc) -> None:
    """create_jobs (returning ids: the COPY path) on Django's connection: a rolled-back
    block leaves none, a committed block's jobs are woken by on_commit and run in order."""
    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order, Shipment
    from tests.djangoproject.shop.views import Refused

    customer = _customer()
    queue = f"customer-{customer}"

    def items(order_ids: list[int]) -> list[dict[str, Any]]:
        return [
            {"queue": queue, "action": ship.name, "params": {"customer": customer, "order_id": order_id}}
            for order_id in order_ids
        ]

    try:
        with transaction.atomic():
            dropped = shop.create_jobs(items([0, 0]), returning="ids")
            raise Refused
    except Refused:
        pass
    assert [shop.get_job(job_id) for job_id in dropped] == [None, None]
    with transaction.atomic():
        orders = [Order.objects.create(customer=customer, item=f"item-{n}").id for n in range(3)]
        ids = shop.create_jobs(items(orders), returning="ids")
        assert shop.get_job(ids[0]) is None  # another connection: not committed yet
    for job_id in ids:
        job = shop.wait(job_id, timeout=60)
        assert job.status == "done", job.error
    shipped = list(
        Shipment.objects.filter(customer=customer).order_by("id").values_list("order_id", flat=True)
    )
    assert shipped == orders


def test_a_job_after_one_that_broke_its_orm_connection_gets_a_working_one(django_worker: Proc) -> None:
    """close_old_connections around each job: the broken connection is replaced."""
    from tests.djangoproject.celery_app import break_connection, ship, shop
    from tests.djangoproject.shop.models import Order

    customer = _customer()
    order = Order.objects.create(customer=customer, item="book")
    broken = break_connection.delay(customer=customer)
    after = ship.delay(customer=customer, order_id=order.id)
    assert shop.wait(broken, timeout=60).status == "exhausted"
    job = shop.wait(after, timeout=60)
    assert job.status == "done", job.error


def test_the_admin_lists_filters_and_shows_a_jobs_full_error(
    django_worker: Proc, admin_client: Client
) -> None:
    from tests.djangoproject.celery_app import break_connection, shop

    customer = _customer()
    failed = shop.wait(break_connection.delay(customer=customer), timeout=60)
    assert failed.status == "exhausted" and failed.error

    link = f"/admin/queuetopia/job/{failed.id}/change/"

    def listed(query: str) -> bool:
        page = admin_client.get(f"/admin/queuetopia/job/?{query}")
        assert page.status_code == 200
        return link in page.content.decode()

    assert listed(f"state=exhausted&scope={shop.scope}&q={customer}")
    assert not listed(f"state=done&q={customer}")
    assert listed(f"action=break_connection&queue=customer-{customer}")
    assert listed(f"q={failed.id}")

    detail = admin_client.get(f"/admin/queuetopia/job/{failed.id}/change/")
    assert detail.status_code == 200
    body = detail.content.decode()
    assert "terminating connection" in body  # the driver's message, in the full error


def test_the_admin_actions_retry_and_abort_through_the_library(
    django_worker: Proc, admin_client: Client
) -> None:
    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order

    customer = _customer()
    order = Order.objects.create(customer=customer, item="book")
    later = ship.apply_async(kwargs={"customer": customer, "order_id": order.id}, countdown=3600)
    other = ship.apply_async(kwargs={"customer": f"{customer}-b", "order_id": order.id}, countdown=3600)
    assert shop.get_job(later.id).state.value == "scheduled"  # type: ignore[union-attr]

    response = admin_client.post(
        "/admin/queuetopia/job/", {"action": "retry_jobs", "_selected_action": [later.id]}, follow=True
    )
    assert response.status_code == 200 and _messages(response) == ["retry: 1 job(s)"]
    assert shop.wait(later, timeout=60).status == "done"

    response = admin_client.post(
        "/admin/queuetopia/job/", {"action": "abort_jobs", "_selected_action": [other.id]}, follow=True
    )
    assert _messages(response) == ["abort: 1 job(s)"]
    aborted = shop.get_job(other.id)
    assert aborted is not None and aborted.status == "aborted" and "admin" in (aborted.abort_reason or "")

    # An action that does not apply is reported, not a crash.
    response = admin_client.post(
        "/admin/queuetopia/job/", {"action": "abort_jobs", "_selected_action": [later.id]}, follow=True
    )
    (message,) = _messages(response)
    assert message.startswith(f"job {later.id}:")


def test_the_admin_refuses_other_writes(admin_client: Client) -> None:
    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order

    order = Order.objects.create(customer=_customer(), item="book")
    job = ship.apply_async(kwargs={"customer": order.customer, "order_id": order.id}, countdown=3600)
    assert admin_client.get("/admin/queuetopia/job/add/").status_code == 403
    assert admin_client.post(f"/admin/queuetopia/job/{job.id}/change/", {"queue": "x"}).status_code == 403
    assert admin_client.post(f"/admin/queuetopia/job/{job.id}/delete/", {"post": "yes"}).status_code == 403
    assert shop.get_job(job.id) == job


def test_the_management_command_prints_status_and_jobs(django_worker: Proc) -> None:
    import subprocess

    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order

    order = Order.objects.create(customer=_customer(), item="book")
    job = ship.apply_async(kwargs={"customer": order.customer, "order_id": order.id}, countdown=3600)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.djangoproject.settings"}

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "django", "queuetopia", *args],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    status = manage("status")
    assert status.returncode == 0, status.stderr
    assert f"scope {shop.scope!r}" in status.stdout and f"customer-{order.customer}" in status.stdout
    shown = manage("show", str(job.id))
    assert shown.returncode == 0 and "scheduled" in shown.stdout
    missing = manage("show", "999999999")
    assert missing.returncode == 1 and "no job 999999999" in missing.stderr
    assert "Traceback" not in missing.stderr
