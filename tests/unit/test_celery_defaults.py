"""The Celery defaults a Queuetopia applies: only where the user kept Celery's own."""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from queuetopia_celery import Queuetopia
from queuetopia_celery.celery_defaults import REDIS_TRANSPORT_OPTIONS


def build(app: Celery, tmp_path: Path) -> Queuetopia:
    return Queuetopia("defaults", app=app, database_url=f"sqlite:///{tmp_path / 'jobs.db'}")


def test_a_redis_app_gets_socket_timeouts_and_retry_on_startup(tmp_path):
    app = Celery("t", broker="redis://127.0.0.1:6379/0")
    build(app, tmp_path)
    assert app.conf.broker_connection_retry_on_startup is True
    assert app.conf.broker_transport_options == REDIS_TRANSPORT_OPTIONS


def test_what_the_user_set_wins_even_when_configured_later(tmp_path):
    app = Celery("t")
    build(app, tmp_path)

    class Config:
        broker_url = "redis://127.0.0.1:6379/1"
        broker_transport_options = {"visibility_timeout": 10, "socket_timeout": 5}
        broker_connection_retry_on_startup = False

    app.config_from_object(Config)
    assert app.conf.broker_connection_retry_on_startup is False
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 10 and options["socket_timeout"] == 5
    assert options["socket_keepalive"] is True


def test_other_brokers_keep_their_transport_options(tmp_path):
    app = Celery("t", broker="amqp://guest:guest@127.0.0.1:5672//")
    assert app.conf.broker_url  # configured before the Queuetopia is built
    build(app, tmp_path)
    assert app.conf.broker_transport_options == {}
    assert app.conf.broker_connection_retry_on_startup is True
