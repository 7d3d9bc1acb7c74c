"""A web view of one Queuetopia: queues, jobs, and the operator's actions.

Mount it in your ASGI app, or run it alone with ``queuetopia-celery web``::

    from queuetopia_celery.web import BasicAuth, queuetopia_web

    app.mount("/queues", queuetopia_web(qt, auth=BasicAuth("ops", password)))

Needs the ``web`` extra (``pip install "queuetopia-celery[web]"``). Importing this
package does not import Starlette: :func:`queuetopia_web` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .auth import Authorize, BasicAuth, TokenAuth

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..app import Queuetopia


def queuetopia_web(
    qt: Queuetopia | Sequence[Queuetopia],
    *,
    auth: Authorize | None = None,
    public_reads: bool = False,
    show_params: bool = False,
    page_size: int = 50,
    refresh: int = 10,
    secret_key: str | bytes | None = None,
    title: str = "queuetopia",
) -> Starlette:
    """The web view of ``qt``'s scope, as an ASGI app (Starlette). Given several
    Queuetopias (one per scope), an index of the scopes at ``/`` and each one's view
    under ``/scope/<scope>/``.

    ``auth`` decides who may act (retry, abort, pause, resume, bulk): a
    :class:`BasicAuth`, a :class:`TokenAuth`, or your app's own check, a callable
    ``auth(request) -> bool`` (sync or async). Without it the view is read-only:
    actions are refused (403) and their buttons hidden. With it, reading needs the same
    authorization unless ``public_reads=True`` (e.g. your app already guards the mount).

    ``show_params`` shows job params and results (they can hold personal data: off by
    default). ``refresh`` is the pages' self-refresh period in seconds (0: never).
    ``secret_key`` signs the CSRF tokens: give the same one to every process serving
    the view (default: random per process). Raises :class:`ConfigurationError` for bad
    settings.
    """
    try:
        from .app import Settings, build, build_index
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            'the web view needs the "web" extra: pip install "queuetopia-celery[web]"'
        ) from exc
    if auth is not None and not callable(auth):
        raise ConfigurationError("auth must be BasicAuth, TokenAuth or a callable(request) -> bool")
    for name, value, low in (("page_size", page_size, 1), ("refresh", refresh, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"{name} must be an int >= {low}")
    key = secret_key.encode() if isinstance(secret_key, str) else secret_key
    if key is not None and len(key) < 16:
        raise ConfigurationError("secret_key must be at least 16 bytes")
    settings = Settings(
        auth=auth,
        public_reads=public_reads,
        show_params=show_params,
        page_size=page_size,
        refresh=refresh,
        secret_key=key or os.urandom(32),
        title=title,
    )
    if isinstance(qt, Sequence):
        return build_index(list(qt), settings)
    return build(qt, settings)


__all__ = ["Authorize", "BasicAuth", "TokenAuth", "queuetopia_web"]
