"""Camera URLs as they may be shown: in log lines, error messages and status text."""

from __future__ import annotations

HIDDEN = "***"


def redact_url(source: str) -> str:
    """`source` with its user info, every query value and its fragment replaced by `***`; others unchanged.

    Host, port and path stay, so the camera can still be told apart. Cameras take credentials as
    `user:password@`, as a bare token before `@`, or in the query under names no list can foresee (`pwd`,
    `token`, `sign`, `auth`, ...), so the rule hides all of those rather than guessing which are secret.
    The URL is taken apart by hand, since `urllib` refuses some malformed ones that still need showing.
    """
    scheme, separator, rest = source.partition("://")
    if not separator:
        return source  # a device, file or folder
    authority_end = min((rest.find(mark) for mark in "/?#" if mark in rest), default=len(rest))
    _user_info, at, host = rest[:authority_end].rpartition("@")
    path, hash_mark, fragment = rest[authority_end:].partition("#")
    path, question_mark, query = path.partition("?")
    parts = [scheme, "://", HIDDEN + at if at else "", host, path]
    if question_mark:
        parts += ["?", "&".join(_hide_value(item) for item in query.split("&"))]
    if hash_mark:
        parts += ["#", HIDDEN]
    return "".join(parts)


def _hide_value(item: str) -> str:
    """`name=***` for a query item `name=value`; a bare item (a token on its own) becomes `***`."""
    name, equals, _value = item.partition("=")
    return f"{name}={HIDDEN}" if equals else HIDDEN
