from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .models import Order
from .tasks import ship


@csrf_exempt
def place_order(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        order = Order.objects.create(customer=request.POST["customer"], item=request.POST["item"])
        # Written in this transaction: if the view fails after this line, there is no
        # order and no job; on commit a worker is woken.
        job = ship.delay(customer=order.customer, order_id=order.id)
    return JsonResponse({"order": order.id, "job": job.id})
