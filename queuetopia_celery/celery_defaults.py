"""Safe defaults for the Celery app a Queuetopia runs on, applied only where the
user left Celery's own default (see docs/deployment.md, "Broker outages").

* ``broker_connection_retry_on_startup = True``: a worker started while the broker is
  down waits for it (Celery's behaviour today, which it warns will change).
* On Redis, ``broker_transport_options`` gains the keys the user did not give:
  ``socket_timeout`` and ``socket_connect_timeout`` (a command or a connect to a
  broker that vanished without closing the connection, a lost node or a network
  partition, fails after seconds instead of hanging until the kernel gives up, about
  15 minutes), ``socket_keepalive`` and ``retry_on_timeout``. kombu already pings idle
  connections (``health_check_interval``, 25 s).

Applied when the app's configuration is loaded (``on_after_configure``), so a
configuration given after the Queuetopia is built (``config_from_object``) still wins.
"""

from __future__ import annotations

from typing import Any

#: Redis transport options added when absent.
REDIS_TRANSPORT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 30.0,
    "socket_connect_timeout": 10.0,
    "socket_keepalive": True,
    "retry_on_timeout": True,
}


def apply_celery_defaults(app: Any) -> None:
    """Fill in :data:`REDIS_TRANSPORT_OPTIONS` and ``broker_connection_retry_on_startup``
    on ``app`` where the user kept Celery's default, now if the app is configured and
    again whenever its configuration is (re)loaded."""

    def fill(conf: Any) -> None:
        from celery.app.defaults import DEFAULTS

        if conf.get("broker_connection_retry_on_startup") == DEFAULTS.get(
            "broker_connection_retry_on_startup"
        ):
            conf["broker_connection_retry_on_startup"] = True
        scheme = str(conf.get("broker_url") or "").partition("://")[0].lower()
        if scheme in ("redis", "rediss"):
            given = dict(conf.get("broker_transport_options") or {})
            missing = {k: v for k, v in REDIS_TRANSPORT_OPTIONS.items() if k not in given}
            if missing:
                conf["broker_transport_options"] = {**missing, **given}

    def on_configure(sender: Any = None, source: Any = None, **_: Any) -> None:
        fill(source if source is not None else app.conf)

    if getattr(app, "_queuetopia_defaults", False):
        return
    app._queuetopia_defaults = True
    app.on_after_configure.connect(on_configure, weak=False)
    if app.configured:
        fill(app.conf)
