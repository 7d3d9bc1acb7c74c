from django.contrib import admin
from django.urls import path

from tests.djangoproject.shop.views import create_order

urlpatterns = [
    path("admin/", admin.site.urls),
    path("orders/", create_order),
]
