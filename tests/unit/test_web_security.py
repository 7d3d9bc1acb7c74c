"""The web view's pure security logic: credentials, CSRF tokens, cross-site checks."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pytest

from queuetopia_celery.web.auth import BasicAuth, TokenAuth
from queuetopia_celery.web.csrf import Csrf, cross_site


@dataclass
class FakeRequest:
    headers: dict[str, str] = field(default_factory=dict)


def basic(user: str, password: str) -> FakeRequest:
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    return FakeRequest({"authorization": f"Basic {value}"})


def test_basic_auth_accepts_only_the_exact_credentials() -> None:
    auth = BasicAuth("ops", "pa:ss")
    assert auth(basic("ops", "pa:ss"))  # a password may hold ':'
    assert not auth(basic("ops", "pa:s"))
    assert not auth(basic("Ops", "pa:ss"))
    assert not auth(FakeRequest())
    assert not auth(FakeRequest({"authorization": "Basic !!!not-base64"}))
    assert not auth(FakeRequest({"authorization": "Bearer pa:ss"}))


def test_token_auth_wants_a_bearer_header() -> None:
    auth = TokenAuth("x" * 20)
    assert auth(FakeRequest({"authorization": "Bearer " + "x" * 20}))
    assert not auth(FakeRequest({"authorization": "Bearer " + "x" * 19}))
    assert not auth(basic("x", "x" * 20))
    assert "xxxx" not in repr(auth)


def test_a_csrf_token_is_bound_to_its_cookie_and_to_the_credentials() -> None:
    csrf = Csrf(b"k" * 32)
    nonce = Csrf.new_nonce()
    token = csrf.token(nonce, "Basic b3BzOnNlY3JldA==")
    assert csrf.valid(nonce, token, "Basic b3BzOnNlY3JldA==")
    assert not csrf.valid(Csrf.new_nonce(), token, "Basic b3BzOnNlY3JldA==")  # another cookie
    assert not csrf.valid(nonce, token, "Basic b3RoZXI6b3RoZXI=")  # other credentials
    assert not Csrf(b"j" * 32).valid(nonce, token, "Basic b3BzOnNlY3JldA==")  # another secret
    assert not csrf.valid(nonce, f"{nonce}.", "Basic b3BzOnNlY3JldA==")
    assert not csrf.valid(None, token, "")
    assert not csrf.valid(nonce, None, "")


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        (
            {"sec-fetch-site": "same-origin", "origin": "http://a:1", "host": "b:2"},
            False,
        ),  # proxy rewrote Host
        ({"sec-fetch-site": "cross-site"}, True),
        ({"origin": "https://evil.example", "host": "ops.example"}, True),
        ({"origin": "https://ops.example", "host": "ops.example"}, False),
        ({"origin": "https://ops.example", "host": "backend:8080", "x-forwarded-host": "ops.example"}, False),
        ({"origin": "null", "host": "ops.example"}, True),
        ({"host": "ops.example"}, False),  # not a browser, or an old one: the token decides
    ],
)
def test_cross_site_posts_are_recognised(headers: dict[str, str], refused: bool) -> None:
    assert cross_site(headers) is refused
