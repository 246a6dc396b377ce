"""The MQTT side is safe to run on a shared broker: TLS with verification, logins, an ACL, secret secrets.

Brokers here refuse anonymous clients, check passwords from a `mosquitto_passwd` file and an ACL that
grants the agent only its own topics; certificates come from a CA made in the test.
"""

from __future__ import annotations

import logging
import pathlib
import subprocess
import sys

import pytest

from edge_agent.config import MqttSettings, parse_config
from edge_agent.engine.model_dir import ModelDir
from edge_agent.mqtt import AgentLink, ask_remote
from tests.support.agent import AGENT, QUESTIONS, RunningAgent, agent_config
from tests.support.broker import wait_until

AGENT_USER, AGENT_PASSWORD = "edge-agent", "agent-Pa55-7f3c1e"
HA_USER, HA_PASSWORD = "homeassistant", "ha-Pa55-91b2d0"
ROOT = f"edge-agent/{AGENT}"

AGENT_ONLY_ITS_OWN_TOPICS = f"""\
user {AGENT_USER}
topic readwrite {ROOT}/#
topic read homeassistant/status
topic write homeassistant/#

user {HA_USER}
topic read edge-agent/#
topic write edge-agent/+/ask
topic write edge-agent/+/enabled/+/set
topic write edge-agent/+/check
topic write edge-agent/+/check/+
topic readwrite homeassistant/#
"""
USERS = {AGENT_USER: AGENT_PASSWORD, HA_USER: HA_PASSWORD}


def password_file(folder: pathlib.Path, password: str) -> str:
    """A file in `folder` holding `password`, as the config names one."""
    path = folder / f"password-{password}"
    path.write_text(password + "\n")
    return str(path)


def home_assistant(broker, secrets: pathlib.Path, ca=None) -> MqttSettings:
    """How Home Assistant (or `edge-agent ask`) logs in to `broker`; its password file goes in `secrets`."""
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        username=HA_USER,
        password_file=password_file(secrets, HA_PASSWORD),
        tls_ca_file=str(ca.certificate) if ca else None,
    )


def secured_agent_config(model, broker, video, ca, credentials) -> dict:
    """The agent's config: TLS against `ca`, the password in the systemd credentials directory."""
    (credentials / "mqtt-password").write_text(AGENT_PASSWORD + "\n")
    return agent_config(
        model,
        broker,
        video,
        mqtt={
            "tls_ca_file": str(ca.certificate),
            "username": AGENT_USER,
            "password_file": "mqtt-password",
        },
    )


def test_the_agent_works_over_tls_with_a_password_under_an_acl_granting_only_its_own_topics(
    tiny_llava_int8, tiny_engine, moving_video, make_ca, make_secure_broker, observer, tmp_path, monkeypatch, caplog
):
    ca = make_ca()
    broker = make_secure_broker(USERS, AGENT_ONLY_ITS_OWN_TOPICS, ca)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = secured_agent_config(tiny_llava_int8, broker, moving_video, ca, tmp_path)
    watcher = observer(home_assistant(broker, tmp_path, ca), f"{ROOT}/#", "homeassistant/#")
    caplog.set_level(logging.INFO)

    with RunningAgent(config, engine=tiny_engine):
        watcher.wait_for(
            f"{ROOT}/availability",
            *(f"{ROOT}/answers/{q['id']}" for q in QUESTIONS),
            f"homeassistant/binary_sensor/{AGENT}_door_open/config",
            timeout=60,
        )
        reply = ask_remote(home_assistant(broker, tmp_path, ca), AGENT, "Is anyone there?", timeout_s=30)

    assert isinstance(reply["answer"], str) and reply["model"] == ModelDir.open(tiny_llava_int8).name
    assert watcher.messages[f"{ROOT}/availability"][0] == b"online"
    assert broker.subscriptions(f"edge-agent-{AGENT}") == {
        f"{ROOT}/ask",
        f"{ROOT}/discovery",
        "homeassistant/status",
        f"{ROOT}/enabled/+/set",
        f"{ROOT}/check",
        f"{ROOT}/check/+",
    }
    assert "refused" not in caplog.text


def test_a_broker_certificate_from_another_ca_is_refused_with_a_clear_log_line_and_retried(
    make_ca, make_secure_broker, tmp_path, caplog
):
    broker = make_secure_broker(USERS, AGENT_ONLY_ITS_OWN_TOPICS, make_ca("the broker's CA"))
    stranger = make_ca("another CA")
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        username=AGENT_USER,
        password_file=password_file(tmp_path, AGENT_PASSWORD),
        tls_ca_file=str(stranger.certificate),
    )
    link = AgentLink(settings, AGENT)
    caplog.set_level(logging.WARNING, logger="edge_agent")

    link.start()
    try:
        wait_until(
            lambda: caplog.text.count("TLS certificate verification failed") >= 2, timeout=8, what="two failed attempts"
        )
        assert not link.connected
        assert (
            "cannot connect (TLS certificate verification failed: self-signed certificate in certificate chain; "
            "check mqtt.tls_ca_file), retrying" in caplog.text
        )
    finally:
        link.stop()


def test_a_wrong_password_is_refused_and_retried_and_no_password_ever_reaches_the_logs(
    make_secure_broker, tmp_path, monkeypatch, caplog
):
    wrong = "wrong-Pa55-c0ffee"
    broker = make_secure_broker(USERS, AGENT_ONLY_ITS_OWN_TOPICS)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "mqtt-password").write_text(wrong)
    config = parse_config(
        {
            "agent_id": AGENT,
            "model": {"path": "unused"},
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": AGENT_USER,
                "password_file": "mqtt-password",
            },
        }
    )
    caplog.set_level(logging.DEBUG)
    link = AgentLink(config.mqtt, AGENT)

    link.start()
    try:
        wait_until(lambda: "refused the connection" in caplog.text, what="a refused login")
        assert not link.connected
        broker.set_password(AGENT_USER, wrong)  # the administrator fixes the broker's side
        broker.restart()
        wait_until(lambda: link.connected, timeout=35, what="connected with the right password")
    finally:
        link.stop()

    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert wrong not in logged and AGENT_PASSWORD not in logged
    assert wrong not in repr(config)


@pytest.mark.parametrize("command", ["run", "ask"])
def test_no_command_takes_a_password_on_its_command_line(command):
    """Command lines are visible to every user of the box (ps, /proc/*/cmdline)."""
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", command, "--help"], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0 and "password" not in result.stdout.lower()
