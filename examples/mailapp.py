"""The quick start's app: each customer's mails sent in order, one at a time."""

import os
import sys

from celery import Celery

from queuetopia_celery import Job, Queuetopia

# Where the jobs and the broker are: the README's quick start exports both variables.
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/mailapp")
BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("mailapp", broker=BROKER_URL)
app.conf.worker_prefetch_multiplier = 1  # recommended: a worker takes one message at a time
app.conf.beat_scheduler = "celery.beat:Scheduler"  # beat keeps its schedule in memory, no file

mail = Queuetopia("mail", app=app, database_url=DATABASE_URL, poll_interval=2)


@mail.performer("send_mail")
def send_mail(job: Job) -> dict[str, str]:
    # A real performer would call an email API here, passing job.idempotency_key.
    print(f"sending job #{job.id} (seq {job.sequence} of {job.queue}) to {job.params['to']}", flush=True)
    return {"status": "sent"}


def produce(count: int, qt: Queuetopia = mail) -> None:
    """Create ``count`` mails for three customers, one queue per customer."""
    for n in range(count):
        customer = f"customer-{n % 3}"
        qt.create_job(customer, "send_mail", {"to": f"{customer}@example.com", "n": n})
    print(f"created {count} jobs in 3 queues")


if __name__ == "__main__":  # python -m examples.mailapp produce 20
    if sys.argv[1:2] != ["produce"]:
        sys.exit("usage: python -m examples.mailapp produce [COUNT]")
    produce(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
