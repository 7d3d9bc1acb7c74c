"""Testing code that creates jobs: pytest examples/test_mailapp.py"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from examples.mailapp import produce, send_mail
from queuetopia_celery import Queuetopia
from queuetopia_celery.testing import assert_job_created, jobs_created, refute_job_created


@pytest.fixture
def mail(tmp_path: Path) -> Iterator[Queuetopia]:
    """The app's performer on a fresh SQLite database per test: every test starts empty."""
    mail = Queuetopia("mail", app=Celery(), database_url=f"sqlite:///{tmp_path}/jobs.db", disabled=True)
    mail.performer("send_mail")(send_mail)
    mail.migrate()
    yield mail
    mail.engine.dispose()


def test_produce_queues_each_customers_mails(mail: Queuetopia) -> None:
    produce(6, mail)
    assert_job_created(
        mail, count=2, queue="customer-1", action="send_mail", params={"to": "customer-1@example.com"}
    )  # params: a subset match
    refute_job_created(mail, queue="customer-3")
    result = mail.drain()  # runs due jobs here, in order
    assert (result.succeeded, result.failed, result.exhausted) == (6, 0, 0)
    sent = jobs_created(mail, queue="customer-1", state="done")  # oldest first
    assert [job.params["n"] for job in sent] == [1, 4]
