"""An MQTT broker on a free loopback port for the demo and the benchmarks: mosquitto where installed, else
an embedded amqtt broker (MQTT 3.1.1 only)."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..errors import UserError

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    protocol: str  # "5" or "3.1.1"
    kind: str  # what serves it, for the progress line

    def client(self) -> mqtt.Client:
        """A paho client (callback API 2) speaking this broker's protocol; set callbacks, then connect."""
        return mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    """Return once a server accepts connections on the loopback `port`; UserError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        time.sleep(0.05)
    raise UserError(f"nothing is listening on 127.0.0.1:{port} after {timeout_s:g} s")


@contextlib.contextmanager
def mosquitto_broker(binary: str, workdir: pathlib.Path) -> Iterator[BrokerAddress]:
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield BrokerAddress("127.0.0.1", port, "5", "mosquitto")
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def amqtt_broker() -> Iterator[BrokerAddress]:
    """An embedded amqtt broker on its own event-loop thread (MQTT 3.1.1 only)."""
    import asyncio

    from amqtt.broker import Broker

    port = free_port()
    loop = asyncio.new_event_loop()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        },
        loop=loop,
    )
    thread = threading.Thread(target=loop.run_forever, name="amqtt", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(broker.start(), loop).result(timeout=10)
    try:
        yield BrokerAddress("127.0.0.1", port, "3.1.1", "embedded amqtt")
    finally:
        # amqtt logs its own cancelled broadcast task as an error on every shutdown: not news for the user.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def local_broker(workdir: pathlib.Path):
    binary = shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if pathlib.Path(p).exists()), None)
    return mosquitto_broker(binary, workdir) if binary else amqtt_broker()
