"""Ordered per customer: a customer's orders ship one at a time, in the order placed."""

from django.utils import timezone
from djangoshop.celery import shipping

from .models import Order


@shipping.task(queue="customer-{customer}", max_attempts=5)
def ship(customer: str, order_id: int) -> str:
    # The order is there: the job was committed in the same transaction as the order.
    order = Order.objects.get(id=order_id)
    order.shipped_at = timezone.now()
    order.save(update_fields=["shipped_at"])
    return f"shipped {order.item} to {customer}"
