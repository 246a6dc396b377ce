"""systemd integration: notify datagrams, a watchdog fed only by progressing loops, journald log priorities."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading

import pytest

from edge_agent import logs, systemd
from edge_agent.errors import UserError

WATCHDOG_USEC = 200_000  # a 0.2 s watchdog: pings every 0.1 s
PING = "WATCHDOG=1"


@contextlib.contextmanager
def progressing(watchdog: systemd.Watchdog, name: str):
    """Run a loop that reports progress every 10 ms for the duration of the block."""
    done = threading.Event()

    def loop():
        while not done.wait(0.01):
            watchdog.progress(name)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.fixture
def watchdog(monkeypatch, notify_socket):
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    watchdog = systemd.Watchdog.from_environment()
    watchdog.register("capture")
    watchdog.register("inference")
    watchdog.start()
    yield watchdog
    watchdog.stop()


def pings_after_settling(notify_socket, duration_s: float = 0.5) -> int:
    """Pings seen over `duration_s`, after letting one ping already decided on arrive and be dropped."""
    notify_socket.collect(0.25)
    return notify_socket.collect(duration_s).count(PING)


def test_notify_sends_one_datagram_to_a_socket_path(notify_socket):
    assert systemd.notify("READY=1")
    assert notify_socket.receive() == "READY=1"


def test_notify_reaches_an_abstract_socket_named_with_a_leading_at(abstract_notify_socket):
    assert systemd.ready()
    assert abstract_notify_socket.receive() == "READY=1"


def test_lifecycle_helpers_send_the_standard_messages(notify_socket):
    systemd.status("camera up\nmodel loaded")
    systemd.stopping()
    assert notify_socket.collect(0.2) == ["STATUS=camera up model loaded", "STOPPING=1"]


def test_notify_outside_systemd_does_nothing_and_says_so(outside_systemd):
    assert systemd.notify("READY=1") is False


def test_notify_to_a_vanished_socket_returns_false_instead_of_raising(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("READY=1") is False


def test_watchdog_interval_is_half_the_period_systemd_asked_for(watchdog):
    assert watchdog.enabled
    assert watchdog.interval_s == pytest.approx(0.1)


def test_watchdog_is_off_without_watchdog_usec(outside_systemd):
    assert not systemd.Watchdog.from_environment().enabled


def test_watchdog_variables_meant_for_another_process_are_ignored(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert not systemd.Watchdog.from_environment().enabled


def test_watchdog_pings_while_every_loop_progresses(watchdog, notify_socket):
    with progressing(watchdog, "capture"), progressing(watchdog, "inference"):
        assert pings_after_settling(notify_socket) >= 2


def test_watchdog_withholds_pings_while_a_loop_stalls_and_resumes_when_it_progresses(watchdog, notify_socket):
    with progressing(watchdog, "capture"):
        assert pings_after_settling(notify_socket) == 0
        assert watchdog.stalled() == ["inference"]
        with progressing(watchdog, "inference"):
            assert pings_after_settling(notify_socket) >= 2


def test_watchdog_keeps_pinging_while_a_loop_is_idle(watchdog, notify_socket):
    watchdog.idle("inference")
    with progressing(watchdog, "capture"):
        assert pings_after_settling(notify_socket) >= 2


def test_an_inference_call_that_never_returns_stops_the_pings_but_waiting_for_a_scene_does_not(watchdog, notify_socket):
    scene_changed, never = threading.Event(), threading.Event()

    def inference_loop():
        watchdog.idle("inference")
        scene_changed.wait()
        watchdog.progress("inference")
        never.wait()  # the model call that hangs

    with progressing(watchdog, "capture"):
        hung = threading.Thread(target=inference_loop, daemon=True)
        hung.start()
        assert pings_after_settling(notify_socket) >= 2
        scene_changed.set()
        assert pings_after_settling(notify_socket) == 0
    never.set()
    hung.join()


def test_progress_from_an_undeclared_loop_is_a_bug_not_silence(watchdog):
    with pytest.raises(KeyError, match="'decoder' was never registered"):
        watchdog.progress("decoder")


def journal_stream_of(stream) -> str:
    stat = os.fstat(stream.fileno())
    return f"{stat.st_dev}:{stat.st_ino}"


@pytest.fixture
def captured_logging():
    """Restores the root logger after a test reconfigures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def read_back(stream) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read()


def test_logs_carry_syslog_priorities_when_stderr_is_the_journal(tmp_path, monkeypatch, captured_logging):
    with open(tmp_path / "journal", "w+") as journal:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(journal))
        logs.configure("DEBUG", stream=journal)
        log = logging.getLogger("edge_agent.test")
        log.debug("frame read")
        log.info("model loaded")
        log.warning("camera slow")
        log.error("camera lost\nsecond line")
        assert read_back(journal).splitlines() == [
            "<7>edge_agent.test: frame read",
            "<6>edge_agent.test: model loaded",
            "<4>edge_agent.test: camera slow",
            "<3>edge_agent.test: camera lost",
            "<3>second line",
        ]


def test_logs_are_plain_with_timestamps_when_stderr_is_not_the_journal(tmp_path, monkeypatch, captured_logging):
    with open(tmp_path / "other", "w+") as journal, open(tmp_path / "stderr", "w+") as stderr:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(journal))
        logs.configure("INFO", stream=stderr)
        logging.getLogger("edge_agent.test").warning("camera slow")
        line = read_back(stderr)
    assert not line.startswith("<")
    assert line.rstrip().endswith("WARNING edge_agent.test: camera slow")


def test_logs_below_the_configured_level_are_dropped(captured_logging):
    stream = io.StringIO()
    logs.configure("warning", stream=stream)
    logging.getLogger("edge_agent.test").info("chatter")
    assert stream.getvalue() == ""


def test_an_unknown_log_level_is_a_user_error(captured_logging):
    with pytest.raises(UserError, match="log level 'LOUD'"):
        logs.configure("LOUD", stream=io.StringIO())
