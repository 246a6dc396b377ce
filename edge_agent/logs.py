"""Logging setup: journald priorities when stderr is the journal, plain timestamped lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from edge_agent.errors import UserError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Python level -> syslog priority, which journald reads from a "<N>" line prefix (sd-daemon(3)).
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """Prefixes every line with its syslog priority; journald adds the timestamp and the unit itself.

    Each line of a multi-line record (a traceback) gets the prefix, because journald stores each line as
    its own entry and would file unprefixed ones at the default priority.
    """

    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python log level (custom levels round down to the next standard one)."""
    standard = max((level for level in _SYSLOG_PRIORITY if level <= levelno), default=logging.DEBUG)
    return _SYSLOG_PRIORITY[standard]


def is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald connection systemd named in `$JOURNAL_STREAM` ("device:inode").

    Comparing the file identity, not just checking that the variable is set, keeps plain output when
    stderr was redirected or the variable was inherited by a child started from a shell.
    """
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send all logging at `level` and above to `stream` (stderr by default), replacing earlier handlers."""
    name = level.upper()
    if name not in LEVELS:
        raise UserError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if is_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)
