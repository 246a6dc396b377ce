"""The status page's server without a browser: who may use it (password, Host, CSRF token, origin), how much
a request may carry, that its actions take the MQTT paths (ask queue and rate limit, switch commands), and
a fuzz test of every endpoint. The browser tests are in tests/test_web_page.py.

The agent runs the tiny model on a looping video with a real broker; requests are raw HTTP over loopback.
"""

from __future__ import annotations

import base64
import json
import logging
import socket

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import parse_config
from edge_agent.errors import UserError
from edge_agent.web.server import MAX_BODY_BYTES
from tests.support.agent import RunningAgent, agent_config, topic
from tests.support.broker import wait_until
from tests.support.videos import FRAME_SIZE

PASSWORD = "correct horse battery staple"
ENDPOINTS = ("/", "/static/app.js", "/api/state", "/api/frame/camera.jpg", "/api/evidence/door_open.jpg")
ACTIONS = ("/api/ask", "/api/enabled", "/api/check", "/api/region")
RESPONSE_TIMEOUT_S = 30.0


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    """Send one raw HTTP/1.1 request and read the whole response: (status, body); status 0 when none came."""
    head = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body and "Content-Length" not in head:
        head["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in head.items()), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=RESPONSE_TIMEOUT_S) as connection:
        connection.sendall("\r\n".join(lines).encode("utf-8", "surrogateescape") + body)
        connection.shutdown(socket.SHUT_WR)
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, rest.partition(b"\r\n\r\n")[2]


def basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"installer:{password}".encode()).decode()}


def action_headers(port: int, token: str, **extra) -> dict:
    return {"X-CSRF-Token": token, "Content-Type": "application/json", **extra}


def csrf_token(port: int, headers: dict | None = None) -> str:
    status, body = request(port, "GET", "/api/state", headers=headers)
    assert status == 200, body
    return json.loads(body)["csrf_token"]


@pytest.fixture(scope="module")
def page_agent(tiny_llava_int8, tiny_engine, module_broker, static_video, tmp_path_factory):
    """One agent without a password for the tests that do not change its state for good."""
    config = agent_config(tiny_llava_int8, module_broker, static_video, state_dir=str(tmp_path_factory.mktemp("state")))
    running = RunningAgent(config, engine=tiny_engine)
    with running as agent:
        wait_until(lambda: agent.board.snapshot()["questions"][0]["answered_ts"] is not None, what="a first answer")
        yield agent, running


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "web-password"
    path.write_text(PASSWORD + "\n")
    return path


def test_listening_beyond_loopback_without_a_password_is_refused_at_load(tiny_llava_int8, broker, static_video):
    config = agent_config(tiny_llava_int8, broker, static_video, web={"listen": "0.0.0.0:8470"})
    with pytest.raises(UserError) as refused:
        parse_config(config)
    assert str(refused.value).splitlines() == [
        "config.yaml: web.listen: 0.0.0.0:8470 is reachable from the network: set web.password_file too "
        "(or listen on 127.0.0.1)"
    ]
    assert parse_config({**config, "web": {"listen": "0.0.0.0:8470", "password_file": "web-password"}})
    assert parse_config({**config, "web": {"listen": "0.0.0.0:8470", "enabled": False}})


def test_a_missing_or_wrong_password_is_refused_and_guessing_is_slowed(
    tiny_llava_int8, tiny_engine, broker, static_video, password_file
):
    config = agent_config(tiny_llava_int8, broker, static_video, web={"password_file": str(password_file)})
    with RunningAgent(config, engine=tiny_engine) as agent:
        port = agent.web_port
        assert request(port, "GET", "/api/state")[0] == 401
        assert request(port, "GET", "/", headers=basic("wrong"))[0] == 401
        assert request(port, "GET", "/", headers={"Authorization": "Basic !!not base64"})[0] == 401
        assert request(port, "GET", "/api/state", headers=basic(PASSWORD))[0] == 200
        for _ in range(10):
            request(port, "GET", "/", headers=basic("guess"))
        status, body = request(port, "GET", "/api/state", headers=basic(PASSWORD))
        assert status == 429, "the right password must not be checked once the wrong ones are spent"
        assert json.loads(body) == {"error": "too many wrong passwords; try again in a minute"}


def test_a_request_naming_another_host_is_refused_on_loopback(page_agent):
    """A site whose name resolves to 127.0.0.1 (DNS rebinding) must not read the camera."""
    agent, _ = page_agent
    status, _ = request(agent.web_port, "GET", "/api/state", headers={"Host": f"evil.example:{agent.web_port}"})
    assert status == 421
    assert request(agent.web_port, "GET", "/api/state", headers={"Host": f"localhost:{agent.web_port}"})[0] == 200


def test_an_action_without_the_csrf_token_or_from_another_origin_is_refused(page_agent, subscriber, module_broker):
    agent, _ = page_agent
    port = agent.web_port
    token = csrf_token(port)
    body = json.dumps({"question_id": "scene", "enabled": False}).encode()
    refusals = [
        {"Content-Type": "application/json"},
        action_headers(port, "not-the-token"),
        action_headers(port, token, Origin="http://evil.example"),
    ]
    for headers in refusals:
        status, reply = request(port, "POST", "/api/enabled", body, headers)
        assert status == 403, (headers, reply)
    assert agent.board.snapshot()["questions"][3]["enabled"] is True
    listener = subscriber(module_broker, topic("enabled", "scene"))
    allowed = action_headers(port, token, Origin=f"http://127.0.0.1:{port}")
    assert request(port, "POST", "/api/enabled", body, allowed)[0] == 202
    wait_until(lambda: [m.payload for m in listener.on(topic("enabled", "scene"))][-1:] == [b"OFF"], what="OFF")
    body = json.dumps({"question_id": "scene", "enabled": True}).encode()
    assert request(port, "POST", "/api/enabled", body, allowed)[0] == 202
    wait_until(lambda: agent.board.snapshot()["questions"][3]["enabled"], what="enabled again")


def test_an_oversized_or_unsized_body_is_refused(page_agent):
    agent, _ = page_agent
    port = agent.web_port
    headers = action_headers(port, csrf_token(port))
    big = json.dumps({"question": "x" * MAX_BODY_BYTES}).encode()
    status, body = request(port, "POST", "/api/ask", big, headers)
    assert (status, json.loads(body)) == (413, {"error": f"request body larger than {MAX_BODY_BYTES} bytes"})
    status, _ = request(port, "POST", "/api/ask", b"", headers)
    assert status == 411


def test_an_ask_from_the_page_is_answered_with_its_image_and_rate_limited_like_mqtt(page_agent):
    agent, _ = page_agent
    port = agent.web_port
    headers = action_headers(port, csrf_token(port))
    ask = json.dumps({"question": "Is the door open?", "type": "yes_no", "region": [0, 0, 0.5, 1]}).encode()
    status, body = request(port, "POST", "/api/ask", ask, headers)
    reply = json.loads(body)
    assert status == 200, reply
    assert reply["type"] == "yes_no" and reply["value"] in (True, False) and reply["answer"]
    assert reply["evidence"].startswith("data:image/jpeg;base64,")
    jpeg = base64.b64decode(reply["evidence"].removeprefix("data:image/jpeg;base64,"))
    shown = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert shown.shape[:2] == (FRAME_SIZE[1], FRAME_SIZE[0] // 2)  # the region's crop: the left half
    statuses = [request(port, "POST", "/api/ask", ask, headers)[0] for _ in range(agent.config.mqtt.ask_burst + 1)]
    assert statuses[-1] == 429
    limited = agent.metrics.registry.get_sample_value("edge_agent_ask_requests_total", {"result": "rate_limited"})
    assert limited >= 1


def test_live_updates_stream_the_snapshot_as_server_sent_events(page_agent):
    agent, _ = page_agent
    head = f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{agent.web_port}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", agent.web_port), timeout=RESPONSE_TIMEOUT_S) as connection:
        connection.sendall(head.encode())
        received = b""
        while received.count(b"\n\n") < 2:  # the end of the headers and of the first event
            received += connection.recv(65536)
    headers, _, events = received.partition(b"\r\n\r\n")
    assert b"Content-Type: text/event-stream" in headers
    event, data = events.split(b"\n")[:2]
    assert event == b"event: state"
    snapshot = json.loads(data.removeprefix(b"data: "))
    assert [question["id"] for question in snapshot["questions"]] == ["door_open", "people", "cup", "scene"]
    assert snapshot["mqtt"]["connected"] is True and snapshot["cameras"][0]["id"] == "camera"
    assert "csrf_token" not in snapshot


def test_the_region_endpoint_gives_a_checked_line_for_config_yaml(page_agent):
    agent, _ = page_agent
    port = agent.web_port
    headers = action_headers(port, csrf_token(port))
    status, body = request(
        port, "POST", "/api/region", json.dumps({"region": [0.1, 0.25, 0.5004, 0.9]}).encode(), headers
    )
    assert (status, json.loads(body)) == (
        200,
        {"region": [0.1, 0.25, 0.5, 0.9], "line": "region: [0.1, 0.25, 0.5, 0.9]"},
    )
    status, body = request(
        port, "POST", "/api/region", json.dumps({"region": [0.5, 0.2, 0.5001, 0.9]}).encode(), headers
    )
    assert status == 400 and "must not be empty" in json.loads(body)["error"]


hostile_text = st.text(max_size=40) | st.sampled_from(["\x00", "../../etc/passwd", "%00", "é" * 30, "{}", "[]"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(hostile_text, children, max_size=5),
    max_leaves=12,
)
bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "question": hostile_text,
            "type": hostile_text,
            "options": json_values,
            "region": json_values,
            "question_id": st.sampled_from(["door_open", "scene", None, ""]) | hostile_text,
            "enabled": json_values,
            "max_new_tokens": json_values,
        },
    ).map(lambda fields: json.dumps(fields).encode())
    | json_values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=200)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS"]) | st.text("ABCXYZ", min_size=1),
    path=st.sampled_from(ENDPOINTS + ACTIONS) | st.sampled_from(ENDPOINTS + ACTIONS).map(lambda p: p + "/../x?y=%ff"),
    body=bodies,
    with_token=st.booleans(),
    extra=st.dictionaries(
        st.sampled_from(["Origin", "Content-Length", "Transfer-Encoding", "Authorization"]), hostile_text
    ),
)
def test_no_request_to_any_endpoint_earns_a_server_error_or_a_traceback(
    page_agent, caplog, capfd, method, path, body, with_token, extra
):
    agent, running = page_agent
    port = agent.web_port
    headers = {**({"X-CSRF-Token": agent._web.guard.csrf_token} if with_token else {}), **extra}
    extra_clean = {name: value for name, value in headers.items() if "\r" not in value and "\n" not in value}
    with caplog.at_level(logging.DEBUG):
        status, reply = request(port, method, path, body, extra_clean)
    assert status != 0 and status < 500 or status in (501, 503), (status, reply)
    assert not [record for record in caplog.records if record.exc_info], "a traceback in the log"
    assert "Traceback" not in capfd.readouterr().err
    assert running.running


def test_the_agent_still_answers_after_the_fuzz(page_agent):
    """Runs after the fuzz test in the same module: the agent and its page still serve."""
    agent, running = page_agent
    before = agent.board.snapshot()["questions"][0]["answered_ts"]
    wait_until(lambda: agent.board.snapshot()["questions"][0]["answered_ts"] != before, what="a new answer")
    assert running.running
    assert request(agent.web_port, "GET", "/api/state")[0] == 200
