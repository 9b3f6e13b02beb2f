"""Who may use the page: the token, the login cookie, the form token and the Host check.

- With ``web.token`` every request carries it: ``Authorization: Bearer <token>``
  (scrapers, curl) or the session cookie the login form sets (browsers). The cookie
  holds an HMAC of the token, never the token, and is HttpOnly and SameSite=Strict.
- Every POST from a form also carries the form token, a random value of this server
  that only the page itself shows: another site cannot read it, so it cannot make a
  retoucher's browser retry or approve anything (CSRF). A bearer request needs none.
- Without a token (localhost only) the Host header must name a loopback host, so a
  web page whose DNS name is re-pointed at 127.0.0.1 (DNS rebinding) is refused.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from http.cookies import CookieError, SimpleCookie

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


class Gate:
    def __init__(self, web: WebConfig):
        self.token = web.token.reveal() if web.token is not None else None
        self.form_token = secrets.token_urlsafe(24)
        self._session = (hmac.new(self.token.encode(), b"rembgd web session", hashlib.sha256)
                         .hexdigest() if self.token else None)

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
        return (self.bearer_ok(headers.get("Authorization"))
                or self._cookie_ok(headers.get("Cookie")))

    def form_ok(self, headers, form: dict[str, str]) -> bool:
        """A POST action is allowed: authenticated, and from this page (or a bearer client)."""
        if not self.authenticated(headers):
            return False
        if self.bearer_ok(headers.get("Authorization")):
            return True
        return hmac.compare_digest(form.get("form_token", "").encode(), self.form_token.encode())

    def login(self, given: str) -> str | None:
        """The Set-Cookie value for a correct token, else None."""
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            return None
        return f"{COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict"

    def logout_cookie(self) -> str:
        """The Set-Cookie value that clears the session in this browser. The cookie is
        derived from the token, so a copied cookie works until ``web.token`` changes."""
        return f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"

    def _cookie_ok(self, header: str | None) -> bool:
        if not header:
            return False
        try:
            jar = SimpleCookie(header)
        except CookieError:
            return False
        morsel = jar.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(),
                                                          self._session.encode())
