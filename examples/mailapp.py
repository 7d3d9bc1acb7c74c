"""An example app: the README's quick start, as a real file the tests run.

    celery -A examples.mailapp worker -B --loglevel INFO
    python -m examples.mailapp produce 20
"""

from __future__ import annotations

import os
import sys

from celery import Celery

from queuetopia_celery import Job, Queuetopia

app = Celery("mailapp", broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.worker_prefetch_multiplier = 1

mail = Queuetopia(
    "mail",
    app=app,
    database_url=os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/test"),
    poll_interval=float(os.environ.get("POLL_INTERVAL", "2")),
)


@mail.performer("send_mail")
def send_mail(job: Job) -> dict[str, str]:
    # A real performer would call an email API here, passing job.idempotency_key.
    print(f"sending mail #{job.sequence} of {job.queue} to {job.params['to']}", flush=True)
    return {"status": "sent"}


def produce(count: int) -> None:
    mail.migrate()
    for i in range(count):
        customer = f"customer-{i % 3}"
        mail.create_job(customer, "send_mail", {"to": f"{customer}@example.com", "n": i})
    print(f"created {count} jobs in 3 queues")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "produce":
        produce(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    else:
        print(__doc__)
