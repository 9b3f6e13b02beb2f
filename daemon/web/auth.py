"""Who may use the page: the token, the login cookie, the form token and the Host check.

- With ``web.token`` every request carries it: ``Authorization: Bearer <token>``
  (scrapers, curl) or the session cookie the login form sets (browsers). The cookie
  is ``<expires>.<random id>.<HMAC>`` under a key derived from the token (never the
  token itself), HttpOnly, SameSite=Strict, and it expires after ``web.session_hours``.
- Every POST from the page also carries the form token, an HMAC of the session's
  random id that only a page served to that browser shows: another site cannot read
  it, so it cannot make a retoucher's browser retry or approve anything (CSRF).
  Without a token the page still gives each browser a session, for its form token.
  A bearer request needs none.
- Without a token (localhost only) the Host header must name a loopback host, so a
  web page whose DNS name is re-pointed at 127.0.0.1 (DNS rebinding) is refused.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Callable

from daemon.config import WebConfig

COOKIE = "rembgd_session"


_PORT = re.compile(r"(?::[0-9]{0,5})?")  # RFC 9110 uri-host [ ":" port ], port = *DIGIT
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")  # a DNS name or an IPv4 address


def host_of(header: str) -> str | None:
    """The host a Host header names, lower-cased: ``[IPv6]`` or a name (or IPv4), each
    with an optional ``:port``; None for anything else (``[::1]x``, ``a:b:c``, spaces)."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        inner, rest = text[1:end], text[end + 1:]
        if end < 0 or not _PORT.fullmatch(rest):
            return None
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            return None
    name, colon, port = text.partition(":")
    if not _NAME.fullmatch(name) or not _PORT.fullmatch(colon + port):
        return None
    return name


@dataclass(frozen=True)
class Session:
    """A browser's session: its random id (the form token is derived from it) and when
    it ends."""

    nonce: str
    expires: int  # unix time


class Gate:
    def __init__(self, web: WebConfig, now: Callable[[], float] = time.time):
        self.token = web.token.reveal() if web.token is not None else None
        self.lifetime = max(1, int(web.session_hours * 3600))
        self._now = now
        # with a token the key is derived from it (sessions survive a restart and end when
        # the token changes); without one it is this process's own
        seed = self.token.encode() if self.token else secrets.token_bytes(32)
        self._key = hmac.new(seed, b"rembgd web session key", hashlib.sha256).digest()

    @property
    def needs_login(self) -> bool:
        return self.token is not None

    def host_allowed(self, host_header: str | None) -> bool:
        if self.token is not None:
            return True
        host = host_of(host_header or "")
        if host is None:
            return False
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def bearer_ok(self, authorization: str | None) -> bool:
        scheme, _, value = (authorization or "").partition(" ")
        return self.token is not None and scheme.lower() == "bearer" and \
            hmac.compare_digest(value.strip().encode(), self.token.encode())

    def authenticated(self, headers) -> bool:
        if self.token is None:
            return True
        return self.bearer_ok(headers.get("Authorization")) or self.session(headers) is not None

    # ------------------------------------------------------------ sessions

    def session(self, headers) -> Session | None:
        """The request's valid, unexpired session cookie, or None."""
        header = headers.get("Cookie")
        if not header:
            return None
        try:
            morsel = SimpleCookie(header).get(COOKIE)
        except CookieError:
            return None
        if morsel is None:
            return None
        expires, _, rest = morsel.value.partition(".")
        nonce, _, sig = rest.partition(".")
        if not expires.isdigit() or not nonce or not hmac.compare_digest(
                sig.encode(), self._sign(f"session:{expires}.{nonce}").encode()):
            return None
        if int(expires) <= self._now():
            return None
        return Session(nonce, int(expires))

    def new_session(self) -> tuple[Session, str]:
        """A fresh session and its Set-Cookie value."""
        session = Session(secrets.token_urlsafe(18), int(self._now()) + self.lifetime)
        value = f"{session.expires}.{session.nonce}"
        value += "." + self._sign(f"session:{value}")
        return session, (f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; "
                         f"Max-Age={self.lifetime}")

    def form_token(self, session: Session) -> str:
        """The CSRF token of one session: only a page served to that browser shows it."""
        return self._sign(f"form:{session.nonce}")

    def form_ok(self, headers, form: dict[str, str]) -> bool:
        """A POST action is allowed: authenticated, and from this session's page (its form
        token in the form or the X-Form-Token header), or a bearer client."""
        if self.bearer_ok(headers.get("Authorization")):
            return True
        session = self.session(headers)
        if session is None:
            return False
        given = form.get("form_token") or headers.get("X-Form-Token") or ""
        return hmac.compare_digest(given.encode(), self.form_token(session).encode())

    def login(self, given: str) -> str | None:
        """The Set-Cookie value for a correct token, else None."""
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            return None
        return self.new_session()[1]

    def logout_cookie(self) -> str:
        """The Set-Cookie value that clears the session in this browser. A copied cookie
        still works until it expires (``web.session_hours``) or ``web.token`` changes."""
        return f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:43]
