"""Deployment files: the systemd unit is valid and hardened, the installer's dry run, the example broker config."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest

from edge_agent.devtools.loopback import free_port, wait_for_port

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "edge-agent.service"
MOSQUITTO = "/usr/sbin/mosquitto"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)
needs_mosquitto = pytest.mark.skipif(
    not pathlib.Path(MOSQUITTO).exists() or shutil.which("mosquitto_passwd") is None,
    reason="mosquitto is not installed (apt-get install mosquitto)",
)


def unit_settings() -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in the unit, in order (keys may repeat)."""
    settings, section = [], ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.append((section, key, value))
    return settings


def setting(key: str) -> list[str]:
    return [value for _, name, value in unit_settings() if name == key]


def exposure_score(unit: pathlib.Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout).group(1))


def test_the_unit_waits_for_readiness_and_restarts_a_hung_agent():
    assert setting("Type") == ["notify"]
    assert setting("NotifyAccess") == ["main"]
    assert setting("ExecStart") == ["/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/config.yaml"]
    assert setting("Restart") == ["on-failure"]
    assert setting("WatchdogSec") and setting("TimeoutStopSec")


def test_the_unit_keeps_device_access_to_cameras_gpus_and_npus_only():
    assert setting("DevicePolicy") == ["closed"]
    assert setting("DeviceAllow") == ["char-video4linux rw", "char-drm rw", "char-accel rw"]
    assert setting("SupplementaryGroups") == ["video render"]


def test_the_unit_does_not_forbid_the_executable_memory_openvino_needs():
    assert setting("MemoryDenyWriteExecute") == []


@needs_systemd_analyze
def test_the_unit_scores_at_most_1_5_in_systemd_security_analysis():
    assert exposure_score(UNIT) <= 1.5


@needs_systemd_analyze
def test_the_readme_states_the_measured_score():
    stated = re.search(r"scores ([0-9.]+)", (DEPLOY / "README.md").read_text()).group(1)
    assert float(stated) == exposure_score(UNIT)


@needs_systemd_analyze
def test_systemd_finds_nothing_to_complain_about_in_the_unit(tmp_path):
    # verify also checks that ExecStart's binary exists, and /opt/edge-agent is not installed on a
    # development machine: check a copy that runs /bin/true instead, everything else unchanged.
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/edge-agent/venv/bin/edge-agent", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def run_installer(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEPLOY / "install.sh"), *arguments], capture_output=True, text=True, timeout=30)


def test_the_installer_dry_run_lists_every_step_and_changes_nothing():
    touched = [pathlib.Path("/opt/edge-agent"), pathlib.Path("/etc/systemd/system/edge-agent.service")]
    existed = [path.exists() for path in touched]
    result = run_installer("--dry-run")
    assert result.returncode == 0, result.stderr
    assert "/opt/edge-agent/venv/bin/pip install --upgrade " + str(DEPLOY.parent) in result.stdout
    assert f"install -m 0644 {UNIT} /etc/systemd/system/edge-agent.service" in result.stdout
    assert "/etc/edge-agent/config.yaml" in result.stdout
    assert "/etc/edge-agent/mqtt-password" in result.stdout
    assert "Next steps" in result.stdout
    assert [path.exists() for path in touched] == existed


def test_the_installer_refuses_an_unknown_option():
    result = run_installer("--force")
    assert result.returncode == 2
    assert "unknown option '--force'" in result.stderr


@pytest.fixture(scope="module")
def example_broker(tmp_path_factory):
    """Mosquitto running deploy/mosquitto.conf and acl.example, with test users, on a free loopback port."""
    directory = tmp_path_factory.mktemp("broker")
    passwords = directory / "passwd"
    for index, user in enumerate(("edge-agent", "homeassistant")):
        create = ["-c"] if index == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwords), user, user + "-pw"], check=True, timeout=10)
    shutil.copy(DEPLOY / "acl.example", directory / "acl")
    port = free_port()
    config = (
        (DEPLOY / "mosquitto.conf")
        .read_text()
        .replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
        .replace("/etc/mosquitto/passwd", str(passwords))
        .replace("/etc/mosquitto/acl", str(directory / "acl"))
    )
    # Started as root, mosquitto drops to the "mosquitto" user, who cannot read pytest's private
    # temporary directory; keep root for the test only.
    (directory / "mosquitto.conf").write_text(config + "user root\n")
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(directory / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, timeout_s=5.0)
        yield port
    finally:
        broker.terminate()
        broker.wait(timeout=10)


class Session:
    """One MQTT v5 client connected to the example broker, collecting what it receives."""

    def __init__(self, port: int, user: str | None):
        self.received: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.connected = threading.Event()
        self.reason = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if user:
            self.client.username_pw_set(user, user + "-pw")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK within 5 s"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.reason = reason_code
        self.connected.set()

    def _on_message(self, client, userdata, message):
        with self.arrived:
            self.received.append((message.topic, message.payload))
            self.arrived.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5), "no SUBACK within 5 s"

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def wait_for(self, topic: str, timeout_s: float = 5.0) -> list[tuple[str, bytes]]:
        """Everything received up to and including the first message on `topic`."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: any(t == topic for t, _ in self.received), timeout_s)
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sessions(example_broker):
    opened = []

    def open_session(user: str | None) -> Session:
        opened.append(Session(example_broker, user))
        return opened[-1]

    yield open_session
    for session in opened:
        session.close()


@needs_mosquitto
def test_the_example_broker_refuses_anonymous_clients(sessions):
    assert sessions(None).reason.is_failure


@needs_mosquitto
def test_home_assistant_reads_the_agents_answers(sessions):
    agent, home_assistant = sessions("edge-agent"), sessions("homeassistant")
    assert not agent.reason.is_failure
    home_assistant.subscribe("edge-agent/#")
    agent.publish("edge-agent/kiosk/state/door_open", "ON")
    assert home_assistant.wait_for("edge-agent/kiosk/state/door_open") == [("edge-agent/kiosk/state/door_open", b"ON")]


@needs_mosquitto
def test_home_assistant_may_ask_but_not_forge_answers(sessions):
    agent, home_assistant = sessions("edge-agent"), sessions("homeassistant")
    agent.subscribe("edge-agent/#")
    home_assistant.publish("edge-agent/kiosk/answers/door_open", "forged")
    home_assistant.publish("edge-agent/kiosk/ask", "is the door open?")
    assert agent.wait_for("edge-agent/kiosk/ask") == [("edge-agent/kiosk/ask", b"is the door open?")]
