"""A stand-in for systemd's notify socket: a real AF_UNIX datagram socket named by `$NOTIFY_SOCKET`."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest


class NotifySocket:
    """The receiving end of sd_notify: collects the datagrams the agent sends."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def receive(self, timeout_s: float = 2.0) -> str | None:
        """The next message, or None if none arrives within `timeout_s`."""
        self._sock.settimeout(timeout_s)
        try:
            return self._sock.recv(4096).decode()
        except TimeoutError:
            return None

    def collect(self, duration_s: float) -> list[str]:
        """Every message received during the next `duration_s` seconds."""
        messages = []
        deadline = time.monotonic() + duration_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None:
                messages.append(message)
        return messages

    def drain(self) -> None:
        """Drop what has already arrived."""
        while self.receive(0.001) is not None:
            pass


def _bound_datagram_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A notify socket at a filesystem path, exported as `$NOTIFY_SOCKET`."""
    path = str(tmp_path / "notify")
    with _bound_datagram_socket(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield NotifySocket(sock)


@pytest.fixture
def abstract_notify_socket(monkeypatch):
    """A notify socket in the abstract namespace, exported as `$NOTIFY_SOCKET=@name` as systemd does."""
    name = f"edge-agent-test-{os.getpid()}-{uuid.uuid4().hex}"
    with _bound_datagram_socket("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield NotifySocket(sock)


@pytest.fixture
def outside_systemd(monkeypatch):
    """An environment without any of systemd's notify or watchdog variables."""
    for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(variable, raising=False)
