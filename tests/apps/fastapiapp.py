"""A FastAPI app whose endpoint writes a row and creates a job in one async transaction."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from queuetopia_celery.aio import AsyncQueuetopia

ORDERS_DDL = "CREATE TABLE IF NOT EXISTS fa_orders (id bigserial PRIMARY KEY, customer text NOT NULL)"


class OrderIn(BaseModel):
    customer: str
    fail: bool = False


def build(jobs: AsyncQueuetopia, engine: AsyncEngine) -> FastAPI:
    app = FastAPI()

    @app.post("/orders")
    async def create_order(order: OrderIn) -> dict[str, Any]:
        async with engine.begin() as conn:
            order_id = (
                await conn.execute(
                    text("INSERT INTO fa_orders (customer) VALUES (:c) RETURNING id"), {"c": order.customer}
                )
            ).scalar_one()
            job = await jobs.create_job(
                f"customer-{order.customer}", "work", {"echo": order_id}, connection=conn
            )
            if order.fail:
                raise HTTPException(409, "refused")  # leaves the block: rolled back
        return {"order": order_id, "job": job.id}

    return app
