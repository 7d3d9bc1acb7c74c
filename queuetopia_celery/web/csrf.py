"""CSRF protection for the web view's forms: a signed double-submit token.

Why this and not a library: the view has no session store, and the CSRF packages for
Starlette are small single-maintainer projects; the standard library's ``hmac`` does the
whole job in a few lines that the tests exercise. The scheme is OWASP's "signed
double-submit cookie":

- a random nonce lives in an ``HttpOnly``, ``SameSite=Strict`` cookie;
- each form carries ``nonce.signature``, the signature an HMAC-SHA256 of the nonce and
  of the request's credentials (its ``Authorization`` header) under the app's secret;
- a POST is accepted only when the form's nonce equals the cookie's and the signature
  checks out for this request's credentials.

A cross-site page can neither read the cookie nor sign a nonce without the secret; a
sibling subdomain that can plant cookies still cannot produce a signature bound to the
victim's credentials. On top, a POST whose ``Origin`` is another site, or that the
browser marks ``Sec-Fetch-Site: cross-site``, is refused outright.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

COOKIE = "queuetopia_csrf"
FIELD = "csrf_token"


class Csrf:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(24)

    def _signature(self, nonce: str, credentials: str) -> str:
        message = f"{nonce}|{credentials}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def token(self, nonce: str, credentials: str) -> str:
        """The form field for this cookie nonce and these credentials."""
        return f"{nonce}.{self._signature(nonce, credentials)}"

    def valid(self, cookie: str | None, form_token: str | None, credentials: str) -> bool:
        if not cookie or not form_token:
            return False
        nonce, _, signature = form_token.partition(".")
        return hmac.compare_digest(nonce.encode(), cookie.encode()) and hmac.compare_digest(
            signature.encode(), self._signature(cookie, credentials).encode()
        )


def cross_site(headers: Mapping[str, str]) -> bool:
    """Whether the browser says this request comes from another site: its
    ``Sec-Fetch-Site`` (which a proxy leaves alone) or, from a browser too old to send
    that, an ``Origin`` naming a host other than the request's (``Host`` or, behind a
    proxy, ``X-Forwarded-Host``)."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site == "cross-site"
    origin = headers.get("origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    hosts = {headers.get("host", "")} | {
        host.strip() for host in headers.get("x-forwarded-host", "").split(",") if host.strip()
    }
    return origin.split("://", 1)[-1].rstrip("/") not in hosts
