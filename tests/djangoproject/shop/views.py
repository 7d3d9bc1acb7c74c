"""A view that saves a model and creates a job in one atomic block."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse

from .models import Order


class Refused(Exception):
    pass


def create_order(request: HttpRequest) -> JsonResponse:
    from tests.djangoproject.celery_app import ship

    customer = request.POST["customer"]
    try:
        with transaction.atomic():
            order = Order.objects.create(customer=customer, item=request.POST["item"])
            job = ship.delay(customer=customer, order_id=order.id)
            if request.POST.get("fail"):
                raise Refused("refused after the job was created")
    except Refused:
        return JsonResponse({"error": "refused"}, status=409)
    return JsonResponse({"order": order.id, "job": job.id})
