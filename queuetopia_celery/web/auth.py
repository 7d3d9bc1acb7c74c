"""Who may act in the web view: HTTP basic credentials, a bearer token, or the host
app's own check.

An authorizer is any callable taking the Starlette request and returning (or awaiting)
True when the request may act. :class:`BasicAuth` and :class:`TokenAuth` also carry the
``WWW-Authenticate`` challenge a refused request gets (401); a plain callable is the
host app's decision, refused with 403. Secrets are compared in constant time and never
shown in a page, an error or ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from ..errors import ConfigurationError


class HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


#: The host app's check: ``authorize(request) -> bool`` (or an awaitable of it).
Authorize = Callable[[Any], "bool | Awaitable[bool]"]


def _same(given: str, expected: str) -> bool:
    # Compare digests: constant time, whatever the lengths.
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


@dataclasses.dataclass(frozen=True)
class BasicAuth:
    """HTTP basic credentials: the browser asks for them once."""

    username: str
    password: str = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not self.username or ":" in self.username or not self.password:
            raise ConfigurationError("web basic auth needs a username (without ':') and a non-empty password")

    challenge = 'Basic realm="queuetopia", charset="UTF-8"'

    def __call__(self, request: HasHeaders) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        username, sep, password = decoded.partition(":")
        # Both compared, always: no early exit that tells which one was wrong.
        return bool(sep) & _same(username, self.username) & _same(password, self.password)


@dataclasses.dataclass(frozen=True)
class TokenAuth:
    """A bearer token (``Authorization: Bearer <token>``), for scripts and for proxies
    that add the header."""

    token: str = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ConfigurationError("a web token must be at least 16 characters long")

    challenge = 'Bearer realm="queuetopia"'

    def __call__(self, request: HasHeaders) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and _same(value.strip(), self.token)
