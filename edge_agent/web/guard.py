"""Who may use the status page: the Host check, the password (HTTP Basic), and the CSRF token of actions.

- Host: on a loopback address the page answers only requests naming a loopback host (`localhost`,
  `127.0.0.1`, `[::1]`), so a web site the browser visits cannot reach it by DNS rebinding (its own name
  resolving to 127.0.0.1) and read the camera. Beyond loopback the password stands in for it.
- Password: HTTP Basic, any user name, compared in constant time (`hmac.compare_digest`). Basic needs no
  login page and no session store, and the browser sends it with the live updates (`EventSource` cannot
  set headers) and images as well. Wrong passwords are rate-limited per client address: once its
  allowance is spent, a client is refused without its password being checked.
- CSRF: a browser sends Basic credentials (and reaches a loopback page) for any site that makes it post,
  so every action also needs the token the page reads from `/api/state` in the `X-CSRF-Token` header (a
  custom header a cross-site form cannot send, and a cross-site script cannot read the token), and an
  `Origin`, when the browser sends one, naming this page's own host.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from urllib.parse import urlsplit

from edge_agent.config import is_loopback
from edge_agent.mqtt.ratelimit import RequestRateLimit

FAILED_LOGINS_PER_MINUTE = 10.0
"""Wrong passwords one client address may send per minute, on average (with as many at once)."""
CSRF_HEADER = "X-CSRF-Token"


class Refused(Exception):
    """A request the guard turns away: the HTTP status and one line saying why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Guard:
    """Checks every request (`admit`) and every action (`check_action`)."""

    def __init__(self, password: str | None, loopback: bool):
        self._password = password.encode() if password is not None else None
        self._loopback = loopback
        self._failed_logins = RequestRateLimit(FAILED_LOGINS_PER_MINUTE, int(FAILED_LOGINS_PER_MINUTE))
        self.csrf_token = secrets.token_urlsafe(32)
        """The token every action must carry; new each time the agent starts."""

    def admit(self, headers, client: str) -> None:
        """Raise `Refused` unless the request names an allowed host and carries the password (if one is set)."""
        if self._loopback and not is_loopback(host_name(headers.get("Host") or "")):
            raise Refused(421, "this page answers only requests for a loopback host such as 127.0.0.1")
        if self._password is None:
            return
        if self._failed_logins.exhausted(client):
            raise Refused(429, "too many wrong passwords; try again in a minute")
        if not hmac.compare_digest(basic_password(headers.get("Authorization") or ""), self._password):
            self._failed_logins.allow(client)
            raise Refused(401, "password required")

    def check_action(self, headers) -> None:
        """Raise `Refused` unless an action carries this page's CSRF token and, if sent, its own origin."""
        origin = headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != (headers.get("Host") or ""):
            raise Refused(403, "cross-origin request refused")
        token = (headers.get(CSRF_HEADER) or "").encode()
        if not hmac.compare_digest(token, self.csrf_token.encode()):
            raise Refused(403, f"missing or wrong {CSRF_HEADER} header: reload the page")


def host_name(host_header: str) -> str:
    """The host of a Host header without its port (`[::1]:8470` -> `::1`)."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if ":" in host_header else host_header


def basic_password(authorization: str) -> bytes:
    """The password of an HTTP Basic `Authorization` header (any user name), or b"" when there is none."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return b""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""
    return decoded.partition(b":")[2]
