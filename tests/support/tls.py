"""A locked-down mosquitto for security tests: test certificates, user names and passwords, an ACL.

Everything is generated in the test's temporary directory with the `openssl` and `mosquitto_passwd`
commands (Debian packages `openssl` and `mosquitto`); nothing is read from or written to /etc.

Fixtures:
- `make_ca(name)`: a new certificate authority (`TestCA`); `ca.server_certificate()` issues the
  broker's certificate for 127.0.0.1 and localhost.
- `make_secure_broker(users, acl, ca=None)`: a started `SecureBroker` that refuses anonymous clients,
  checks `users` (name -> password) and the `acl` text, and speaks TLS with a certificate from `ca`
  when one is given. `set_password(user, password)` changes a password (it applies after `restart()`);
  `subscriptions(client_id)` lists the topic filters a client subscribed to (from the broker's log).
- `observer(settings, *topics)`: an `Observer` client connected with the product's own TLS and login
  code (`new_client`), recording every message on `topics`; closed at teardown.
"""

from __future__ import annotations

import re
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.config import MqttSettings
from edge_agent.mqtt.client import new_client
from tests.support.broker import WAIT_TIMEOUT_S, Broker

OPENSSL_TIMEOUT_S = 20


@dataclass(frozen=True)
class ServerCertificate:
    certificate: Path
    """PEM certificate naming IP 127.0.0.1 and DNS localhost, signed by the CA."""
    key: Path
    """Its private key (PEM, unencrypted)."""


class TestCA:
    """A throwaway certificate authority: a key and a self-signed certificate in `directory`."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.name = name
        self.certificate = directory / "ca.crt"
        self._key = directory / "ca.key"
        _openssl(
            "req",
            "-x509",
            *_NEW_EC_KEY,
            "-keyout",
            self._key,
            "-out",
            self.certificate,
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )

    def server_certificate(self) -> ServerCertificate:
        """A broker certificate for 127.0.0.1 and localhost, signed by this CA."""
        key, request = self.directory / "server.key", self.directory / "server.csr"
        certificate, extensions = self.directory / "server.crt", self.directory / "server.ext"
        extensions.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n"
        )
        _openssl("req", *_NEW_EC_KEY, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1")
        _openssl(
            "x509",
            "-req",
            "-in",
            request,
            "-CA",
            self.certificate,
            "-CAkey",
            self._key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            extensions,
            "-out",
            certificate,
        )
        return ServerCertificate(certificate, key)


_NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*arguments: object) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=OPENSSL_TIMEOUT_S)


class SecureBroker(Broker):
    """Mosquitto without anonymous access: a password file, an ACL file and optionally TLS."""

    def __init__(self, workdir: Path, users: dict[str, str], acl: str, ca: TestCA | None):
        super().__init__(workdir, persistence=False)
        self.passwords = workdir / "passwd"
        self.passwords.write_text("")
        for user, password in users.items():
            self.set_password(user, password)
        acl_file = workdir / "acl"
        acl_file.write_text(acl)
        settings = [
            "allow_anonymous false",
            f"password_file {self.passwords}",
            f"acl_file {acl_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",
        ]
        if ca is not None:
            server = ca.server_certificate()
            settings += [f"cafile {ca.certificate}", f"certfile {server.certificate}", f"keyfile {server.key}"]
        self.config.write_text(
            self.config.read_text().replace("allow_anonymous true\n", "") + "\n".join(settings) + "\n"
        )

    def subscriptions(self, client_id: str) -> set[str]:
        """Every topic filter `client_id` subscribed to, from the broker's log."""
        log = (self.workdir / "mosquitto.log").read_text()
        return set(re.findall(rf"^\d+: {re.escape(client_id)} \d (\S+)$", log, re.MULTILINE))

    def set_password(self, user: str, password: str) -> None:
        """Add `user` or change its password (the broker reads the file when it starts)."""
        subprocess.run(
            ["mosquitto_passwd", "-b", str(self.passwords), user, password],
            check=True,
            capture_output=True,
            timeout=OPENSSL_TIMEOUT_S,
        )


@pytest.fixture
def make_ca(tmp_path_factory):
    def make(name: str = "edge-agent test CA") -> TestCA:
        return TestCA(tmp_path_factory.mktemp("ca"), name)

    return make


@pytest.fixture
def make_secure_broker(tmp_path_factory):
    brokers: list[SecureBroker] = []

    def make(users: dict[str, str], acl: str, ca: TestCA | None = None) -> SecureBroker:
        broker = SecureBroker(tmp_path_factory.mktemp("secure-mosquitto"), users, acl, ca)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


class Observer:
    """A client with the product's TLS and login settings that records what arrives on `topics`."""

    def __init__(self, settings: MqttSettings, topics: tuple[str, ...]):
        self.messages: dict[str, list[bytes]] = {}
        self._arrived = threading.Condition()
        subscribed = threading.Event()
        self._client = new_client(settings, f"observer-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._record
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.on_connect = lambda client, *args: client.subscribe([(t, 1) for t in topics])
        self._client.connect(settings.host, settings.port)
        self._client.loop_start()
        assert subscribed.wait(WAIT_TIMEOUT_S), "observer not subscribed"

    def _record(self, client, userdata, message) -> None:
        with self._arrived:
            self.messages.setdefault(message.topic, []).append(message.payload)
            self._arrived.notify_all()

    def wait_for(self, *topics: str, timeout: float = WAIT_TIMEOUT_S) -> None:
        """Wait until something arrived on each of `topics`."""
        with self._arrived:
            arrived = self._arrived.wait_for(lambda: all(t in self.messages for t in topics), timeout)
        missing = [t for t in topics if t not in self.messages]
        assert arrived, f"nothing on {missing} within {timeout} s"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def observer():
    observers: list[Observer] = []

    def observe(settings: MqttSettings, *topics: str) -> Observer:
        observers.append(Observer(settings, topics))
        return observers[-1]

    yield observe
    for each in observers:
        each.close()
