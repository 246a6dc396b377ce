"""The agent end to end: a real video file, the tiny model, and a real mosquitto with a subscriber."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from edge_agent.engine.model_dir import ModelDir
from tests.support.agent import AGENT, QUESTIONS, RunningAgent, agent_config, topic, write_config
from tests.support.broker import wait_until


def test_the_agent_publishes_an_answer_for_every_standing_question(
    tiny_llava_int8, tiny_engine, broker, subscriber, moving_video
):
    listener = subscriber(broker, "edge-agent/#", "homeassistant/#")
    with RunningAgent(agent_config(tiny_llava_int8, broker, moving_video), engine=tiny_engine):
        for question in QUESTIONS:
            message = listener.next(topic("answers", question["id"]), timeout=60)
            payload = json.loads(message.payload)
            assert message.retain
            assert set(payload) == {
                "question_id",
                "question",
                "type",
                "value",
                "raw",
                "frame_ts",
                "answered_ts",
                "latency_ms",
                "model",
                "scene_changed",
                "confidence",
                "latest_value",
                "pending",
            }
            assert payload["question_id"] == question["id"] and payload["type"] == question["type"]
            assert (payload["latest_value"], payload["pending"]) == (payload["value"], None)  # confirm 1 by default
            assert payload["model"] == ModelDir.open(tiny_llava_int8).name
            assert payload["answered_ts"] >= payload["frame_ts"] > time.time() - 120
            state = listener.next(topic("state", question["id"])).payload.decode()
            if question["type"] in ("yes_no", "choice"):  # decided among the options: never unknown
                assert payload["value"] in ([True, False] if question["type"] == "yes_no" else question["options"])
                assert 0 < payload["confidence"] <= 1
                assert state == ({True: "ON", False: "OFF"}.get(payload["value"]) or payload["value"])
            else:
                assert payload["confidence"] is None
                assert state == "unknown" if payload["value"] is None else state == str(payload["value"])
        assert listener.next(topic("availability")).payload == b"online"
        door = json.loads(listener.next(f"homeassistant/binary_sensor/{AGENT}_door_open/config").payload)
        assert door["state_topic"] == topic("state", "door_open") and door["device_class"] == "door"
        assert listener.next(f"homeassistant/sensor/{AGENT}_people/config")
    wait_until(lambda: listener.on(topic("availability"))[-1].payload == b"offline", what="offline on stop")


def test_an_unchanged_scene_is_encoded_once_however_many_frames_arrive(
    tiny_llava_int8, tiny_engine, broker, static_video
):
    with RunningAgent(agent_config(tiny_llava_int8, broker, static_video), engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.frames._value.get() >= 12, timeout=30, what="12 frames")
    assert agent.metrics.scene_changes._value.get() == 1
    assert agent.metrics.inferences._value.get() == 1


def test_a_changing_scene_is_encoded_again_and_change_questions_follow_it(
    tiny_llava_int8, tiny_engine, broker, subscriber, moving_video
):
    listener = subscriber(broker, topic("answers", "scene"))
    with RunningAgent(agent_config(tiny_llava_int8, broker, moving_video), engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.scene_changes._value.get() >= 3, timeout=30, what="3 scene changes")
    assert agent.metrics.inferences._value.get() >= 3
    assert all(json.loads(m.payload)["scene_changed"] for m in listener.on(topic("answers", "scene")))


def test_the_metrics_endpoint_counts_what_the_agent_did(tiny_llava_int8, tiny_engine, broker, moving_video):
    import urllib.request

    with RunningAgent(agent_config(tiny_llava_int8, broker, moving_video), engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.inferences._value.get() >= 2, timeout=30, what="two inferences")
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")
    }
    assert samples["edge_agent_frames_total"] >= samples["edge_agent_scene_changes_total"] >= 2
    assert samples["edge_agent_inferences_total"] >= 2
    assert samples["edge_agent_camera_up"] == 1 and samples["edge_agent_mqtt_connected"] == 1
    assert samples['edge_agent_stage_seconds_count{stage="vision"}'] >= 2
    assert samples['edge_agent_stage_seconds_count{stage="decode"}'] >= 2


def test_edge_agent_ask_without_an_image_asks_the_running_agent(
    tiny_llava_int8, tiny_engine, broker, moving_video, tmp_path
):
    config = agent_config(tiny_llava_int8, broker, moving_video)
    config_file = write_config(tmp_path, config)
    with RunningAgent(config, engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.inferences._value.get() >= 1, timeout=30, what="a first answer")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "ask",
                "Is anyone at the counter?",
                "--config",
                str(config_file),
                "--json",
                "--timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["question"] == "Is anyone at the counter?" and isinstance(reply["answer"], str)
    assert reply["model"] == ModelDir.open(tiny_llava_int8).name


def test_edge_agent_ask_says_clearly_when_no_agent_answers(broker, tmp_path, tiny_llava_int8, static_video):
    config_file = write_config(tmp_path, agent_config(tiny_llava_int8, broker, static_video))
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "ask", "Hello?", "--config", str(config_file), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no agent answered" in result.stderr and "Traceback" not in result.stderr


def test_edge_agent_run_notifies_systemd_and_stops_cleanly_on_sigterm(
    tiny_llava_int8, broker, subscriber, static_video, tmp_path
):
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    listener = subscriber(broker, topic("availability"))
    config_file = write_config(tmp_path, agent_config(tiny_llava_int8, broker, static_video))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="2000000")
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config_file)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages = []
        while "READY=1" not in messages:
            messages.extend(notify.recv(4096).decode().splitlines())
        while "WATCHDOG=1" not in messages:
            messages.extend(notify.recv(4096).decode().splitlines())
        wait_until(lambda: any(m.payload == b"online" for m in listener.on(topic("availability"))), what="online")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stderr.read()
        notify.settimeout(1)
        while "STOPPING=1" not in messages:
            messages.extend(notify.recv(4096).decode().splitlines())
        wait_until(lambda: listener.on(topic("availability"))[-1].payload == b"offline", what="offline")
    finally:
        process.kill()
        notify.close()
