"""A FastAPI service that saves an order and creates its job in one async transaction.

Run the worker with ``celery -A examples.fastapi_orders worker``, and the API with any
ASGI server (``uvicorn examples.fastapi_orders:api``); the tests drive it through httpx.
"""

import os

from celery import Celery
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from queuetopia_celery import Queuetopia
from queuetopia_celery.aio import AsyncQueuetopia

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/mailapp")
BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("orders", broker=BROKER_URL)
orders = Queuetopia("orders", app=app, database_url=DATABASE_URL)


@orders.task(queue="customer-{customer}")
def ship(customer: str, order_id: int) -> str:
    return f"shipped order {order_id} to {customer}"


# The API's own async engine (psycopg 3's async driver), on the same database.
engine = create_async_engine(DATABASE_URL.replace("+psycopg://", "+psycopg_async://"))
jobs = AsyncQueuetopia(orders)
api = FastAPI()


class OrderIn(BaseModel):
    customer: str
    item: str


@api.post("/orders")
async def place_order(order: OrderIn) -> dict[str, int]:
    async with engine.begin() as conn:  # one transaction for the order and its job
        order_id = (
            await conn.execute(
                text("INSERT INTO orders (customer, item) VALUES (:c, :i) RETURNING id"),
                {"c": order.customer, "i": order.item},
            )
        ).scalar_one()
        if order.item == "":
            raise HTTPException(422, "no item")  # rolls back: no order, no job
        # ship.delay(...) awaited, in this transaction: the job commits with the order.
        job = await jobs.delay(ship, customer=order.customer, order_id=order_id, connection=conn)
    return {"order": order_id, "job": job.id}


ORDERS_DDL = "CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, customer text, item text)"
