from django.db import models


class Order(models.Model):
    customer = models.CharField(max_length=100)
    item = models.CharField(max_length=100)


class Shipment(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE)
    customer = models.CharField(max_length=100)
