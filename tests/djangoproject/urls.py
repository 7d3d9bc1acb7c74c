from django.contrib import admin
from django.urls import path

from queuetopia_celery.contrib.django.metrics import metrics_view
from tests.djangoproject.shop.views import create_order

urlpatterns = [
    path("admin/", admin.site.urls),
    path("orders/", create_order),
    path("metrics", metrics_view),
]
