"""``python manage.py place_orders N``: place N orders for one customer, each with its
job in the same atomic block (and one more that rolls back), then wait for the worker
to ship them, and print them in the order they shipped."""

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction
from djangoshop.celery import shipping

from shop.models import Order
from shop.tasks import ship


class Cancelled(Exception):
    pass


class Command(BaseCommand):
    help = "Place N orders (and one cancelled one), wait until they are shipped, in order."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("count", type=int)
        parser.add_argument("--customer", default="alice")

    def handle(self, *args: Any, count: int, customer: str, **options: Any) -> None:
        jobs = []
        for n in range(1, count + 1):
            with transaction.atomic():
                order = Order.objects.create(customer=customer, item=f"item {n}")
                jobs.append(ship.delay(customer=customer, order_id=order.id))
        try:
            with transaction.atomic():
                order = Order.objects.create(customer=customer, item="cancelled")
                ship.delay(customer=customer, order_id=order.id)
                raise Cancelled
        except Cancelled:
            self.stdout.write("cancelled one order: neither it nor its job exists")
        for job in jobs:
            done = shipping.wait(job, timeout=60)
            self.stdout.write(f"job {done.id} (#{done.sequence} of {done.queue}): {done.result}")
