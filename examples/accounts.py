"""A Celery task made ordered: each account's charges applied one at a time, in order."""

import os
import sys

from celery import Celery

from queuetopia_celery import Queuetopia

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/mailapp")
BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("accounts", broker=BROKER_URL)
app.conf.worker_prefetch_multiplier = 1
payments = Queuetopia("payments", app=app, database_url=DATABASE_URL, poll_interval=2)


# Was: @app.task(max_retries=5, time_limit=30)
@payments.task(queue="account-{account_id}", max_retries=5, time_limit=30)
def charge(account_id: int, amount: int) -> dict[str, int]:
    print(f"account {account_id}: charging {amount}", flush=True)
    return {"account_id": account_id, "charged": amount}


def checkout(account_id: int, amount: int) -> None:
    charge.delay(account_id=account_id, amount=amount)  # the caller did not change


if __name__ == "__main__":  # python -m examples.accounts checkout 12
    if sys.argv[1:2] != ["checkout"]:
        sys.exit("usage: python -m examples.accounts checkout [COUNT]")
    for n in range(int(sys.argv[2]) if len(sys.argv) > 2 else 6):
        checkout(account_id=n % 2, amount=n)
