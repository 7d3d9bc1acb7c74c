"""The Django integration in a real Django project (tests/djangoproject) with a real
``celery worker`` of that project, on PostgreSQL: a view saves a model and creates a
job in one ``transaction.atomic()`` block."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

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


def _customer() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def test_a_rolled_back_view_leaves_neither_the_order_nor_the_job(project: object) -> None:
    from tests.djangoproject.celery_app import shop
    from tests.djangoproject.shop.models import Order

    customer = _customer()
    response = Client().post("/orders/", {"customer": customer, "item": "book", "fail": "1"})
    assert response.status_code == 409
    assert not Order.objects.filter(customer=customer).exists()
    assert shop.list_jobs(queue=f"customer-{customer}") == []


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


def test_outside_an_atomic_block_the_job_commits_at_once(django_worker: Proc) -> None:
    from tests.djangoproject.celery_app import ship, shop
    from tests.djangoproject.shop.models import Order

    customer = _customer()
    order = Order.objects.create(customer=customer, item="book")
    job = ship.delay(customer=customer, order_id=order.id)
    assert shop.get_job(job.id) is not None
    assert shop.wait(job, timeout=60).status == "done"


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
