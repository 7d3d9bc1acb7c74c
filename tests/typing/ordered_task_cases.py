"""Checked by mypy in tests/unit/test_ordered_task_typing.py, never run: each line
marked ``# E: <code>`` must get that mypy error, and no other line any error."""

from __future__ import annotations

from typing import assert_type

from celery import Celery

from queuetopia_celery import BoundOrderedTask, Job, OrderedTask, Queuetopia

qt = Queuetopia("typing", app=Celery(), database_url="sqlite:///typing.db")


@qt.task(queue="account-{account_id}", max_retries=5, time_limit=30)
def charge(account_id: int, amount: int) -> dict[str, int]:
    return {"account_id": account_id, "amount": amount}


@qt.task(queue="account-{account_id}", bind=True)
def bound(job: Job, account_id: int) -> int:
    return job.attempts


as_task: OrderedTask[[int, int], dict[str, int]] = charge
as_bound: BoundOrderedTask[[int], int] = bound
assert_type(charge.delay(account_id=42, amount=10), Job)
assert_type(charge(42, 10), dict[str, int])
assert_type(bound.delay(account_id=1), Job)
assert_type(charge.apply_async(kwargs={"account_id": 1, "amount": 2}, countdown=5), Job)

charge.delay(account_id="x", amount=10)  # E: arg-type
charge.delay(account_id=42)  # E: call-arg
charge.delay(42, 10, 3)  # E: call-arg
charge.delay(account=42, amount=10)  # E: call-arg
bound.delay(account_id="x")  # E: arg-type
charge("x", 1)  # E: arg-type
charge.apply_async(kwargs={}, countdown="soon")  # E: arg-type
