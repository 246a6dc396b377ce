"""Talk to systemd: sd_notify datagrams (READY, STATUS, STOPPING) and a watchdog fed only by progressing loops.

Only the standard library is used, so the agent has no libsystemd dependency. Outside systemd (no
`$NOTIFY_SOCKET`) every call is a harmless no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one sd_notify message (e.g. "READY=1"); return False when not running under systemd.

    `$NOTIFY_SOCKET` is read at each call: it is a filesystem path, or an abstract socket name when it
    starts with "@". A socket that cannot be reached is logged and reported as False, never raised: the
    service must keep running even if systemd's socket went away.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], error)
        return False
    return True


def ready() -> bool:
    """Tell systemd that start-up is complete (Type=notify units stay "activating" until then)."""
    return notify("READY=1")


def stopping() -> bool:
    """Tell systemd that a clean shutdown has begun, so a slow stop is not mistaken for a hang."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Show one line of free text in `systemctl status`."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_period_s(environ: Mapping[str, str]) -> float | None:
    """The watchdog period systemd asked for, in seconds, or None when the watchdog is off for this process.

    systemd sets `$WATCHDOG_USEC` (microseconds) and, when it knows the main pid, `$WATCHDOG_PID`; a
    `$WATCHDOG_PID` naming another process means the variables were inherited and are not ours.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


class Watchdog:
    """Sends WATCHDOG=1 only while every registered loop keeps making progress.

    Each loop that must never hang is declared with `register(name)` and calls `progress(name)` each time
    it gets something done. A loop that legitimately has nothing to do (the inference loop waiting for a
    changed scene) calls `idle(name)` just before it starts waiting and `progress(name)` as soon as it has
    work again, before starting that work. An idle loop never blocks the pings; a loop stuck inside a
    call that never returns is not idle (it said `progress` before the call), makes no further progress,
    and so withholds the pings until systemd restarts the service.

    A ping is due every `interval_s` (half the watchdog period). When it is due but some loop has not
    progressed, the thread keeps checking every quarter interval and pings as soon as the loop catches
    up, so one slow iteration costs a late ping, not a restart.
    """

    def __init__(self, period_s: float | None):
        """`period_s`: the systemd watchdog period in seconds, or None to keep track without pinging."""
        self.interval_s = period_s / 2 if period_s else None
        self._lock = threading.Lock()
        self._progressed: dict[str, bool] = {}
        self._idle: set[str] = set()
        self._reported_stall: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_environment(cls) -> Watchdog:
        """The watchdog systemd configured for this process (`$WATCHDOG_USEC`, `$WATCHDOG_PID`)."""
        return cls(watchdog_period_s(os.environ))

    @property
    def enabled(self) -> bool:
        """True when systemd expects pings from this process."""
        return self.interval_s is not None

    def register(self, name: str) -> None:
        """Declare a loop that must keep progressing for the service to count as alive."""
        with self._lock:
            self._progressed[name] = False

    def progress(self, name: str) -> None:
        """Record that loop `name` got something done (and is no longer idle)."""
        with self._lock:
            self._require_registered(name)
            self._progressed[name] = True
            self._idle.discard(name)

    def idle(self, name: str) -> None:
        """Record that loop `name` is waiting for work, which is not a stall, until its next `progress`."""
        with self._lock:
            self._require_registered(name)
            self._idle.add(name)

    def stalled(self) -> list[str]:
        """Loops that are neither idle nor have progressed since the last ping, sorted by name."""
        with self._lock:
            return sorted(
                name for name, progressed in self._progressed.items() if not progressed and name not in self._idle
            )

    def start(self) -> None:
        """Start the ping thread when systemd asked for a watchdog; otherwise do nothing."""
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop pinging and wait for the ping thread to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _require_registered(self, name: str) -> None:
        if name not in self._progressed:
            raise KeyError(f"watchdog loop {name!r} was never registered")

    def _run(self) -> None:
        last_ping = time.monotonic()
        while not self._stop.wait(self.interval_s / 4):
            if time.monotonic() - last_ping >= self.interval_s and self._ping_if_alive():
                last_ping = time.monotonic()

    def _ping_if_alive(self) -> bool:
        stalled = self.stalled()
        self._report_stall_change(frozenset(stalled))
        if stalled:
            return False
        with self._lock:
            self._progressed = dict.fromkeys(self._progressed, False)
        notify("WATCHDOG=1")
        return True

    def _report_stall_change(self, stalled: frozenset[str]) -> None:
        """Log once when loops start or stop stalling, not on every check."""
        if stalled and stalled != self._reported_stall:
            log.warning("watchdog ping withheld: no progress from %s", ", ".join(sorted(stalled)))
        elif not stalled and self._reported_stall:
            log.warning("watchdog pings resumed: every loop is progressing again")
        self._reported_stall = stalled
