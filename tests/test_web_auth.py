"""The page's Host check, in-process (the real-HTTP checks are in tests/test_web.py)."""
from __future__ import annotations

import pytest

from daemon.config import WebConfig
from daemon.web.auth import Gate, host_of

LOOPBACK = ["localhost", "localhost:8765", "LocalHost:1", "localhost:", "127.0.0.1",
            "127.0.0.1:8765", "127.1.2.3:80", "[::1]", "[::1]:8765", "[0:0:0:0:0:0:0:1]:8765",
            " [::1]:8765 "]
REFUSED = ["[::1]x", "[::1]:x", "[::1]:8765x", "[::1]8765", "[::1", "::1", "::1:8765",
           "[127.0.0.1]", "[localhost]", "[::1]:123456", "localhost:8765x", "localhost:80:80",
           "localhost x", "localhost.evil.example", "evil.example", "127.0.0.1.evil.example",
           "127.0.0.1:8765@evil", "localhost/", "", "[]", "[::2]", "0.0.0.0", "10.0.0.1:80",
           "[::ffff:7f00:1]x", "-localhost"]


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_hosts_are_allowed_without_a_token(host):
    assert Gate(WebConfig()).host_allowed(host), host


@pytest.mark.parametrize("host", REFUSED)
def test_anything_else_is_refused_strictly(host):
    """A bracketed IPv6 address with an optional port, or a name (or IPv4) with an optional
    port: nothing after the bracket, no second colon, no loopback-looking prefix."""
    assert not Gate(WebConfig()).host_allowed(host), host


def test_host_of_parses_the_forms_of_rfc_9110():
    assert host_of("[::1]:8765") == "::1"
    assert host_of("[0:0::1]") == "::1"
    assert host_of("Example.COM:443") == "example.com"
    assert host_of("[::1]x") is None and host_of("a:b:c") is None
