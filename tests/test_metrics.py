"""The metrics endpoint: scraped over real HTTP on loopback, it shows what the agent counted and timed."""

from __future__ import annotations

import logging
import re
import socket
import urllib.request

import pytest

from edge_agent.errors import UserError
from edge_agent.metrics import STAGES, Metrics


@pytest.fixture
def metrics():
    metrics = Metrics()
    yield metrics
    metrics.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_a_fresh_endpoint_lists_every_metric_at_zero(metrics):
    text = scrape(metrics.serve("127.0.0.1:0"))
    for line in (
        "edge_agent_frames_total 0.0",
        "edge_agent_scene_changes_total 0.0",
        "edge_agent_inferences_total 0.0",
        "edge_agent_answers_published_total 0.0",
        "edge_agent_camera_up 0.0",
        "edge_agent_mqtt_connected 0.0",
        "edge_agent_mqtt_queue_depth 0.0",
    ):
        assert line in text.splitlines()
    for stage in STAGES:
        assert f'edge_agent_stage_seconds_count{{stage="{stage}"}} 0.0' in text


def test_the_endpoint_shows_observed_values(metrics):
    port = metrics.serve("127.0.0.1:0")
    metrics.frames.inc(3)
    metrics.ask_requests.labels(result="answered").inc()
    metrics.camera_up.set(1)
    metrics.mqtt_queue_depth.set(7)
    metrics.observe_stages({"vision": 0.9, "total": 3.05})
    metrics.observe_stages({"total": 70})
    lines = scrape(port).splitlines()
    assert "edge_agent_frames_total 3.0" in lines
    assert 'edge_agent_ask_requests_total{result="answered"} 1.0' in lines
    assert "edge_agent_camera_up 1.0" in lines
    assert "edge_agent_mqtt_queue_depth 7.0" in lines
    assert 'edge_agent_stage_seconds_bucket{le="1.0",stage="vision"} 1.0' in lines
    assert 'edge_agent_stage_seconds_bucket{le="5.0",stage="total"} 1.0' in lines
    assert 'edge_agent_stage_seconds_bucket{le="60.0",stage="total"} 1.0' in lines
    assert 'edge_agent_stage_seconds_count{stage="total"} 2.0' in lines


def test_the_endpoint_reports_the_processes_memory(metrics):
    resident = re.search(r"^process_resident_memory_bytes (\S+)$", scrape(metrics.serve("127.0.0.1:0")), re.M)
    assert float(resident.group(1)) > 1e6


def test_stage_buckets_span_one_millisecond_to_one_minute(metrics):
    lines = scrape(metrics.serve("127.0.0.1:0")).splitlines()
    assert 'edge_agent_stage_seconds_bucket{le="0.001",stage="decode"} 0.0' in lines
    assert 'edge_agent_stage_seconds_bucket{le="60.0",stage="decode"} 0.0' in lines


def test_an_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="'detokenize'"):
        Metrics().observe_stages({"detokenize": 0.1})


def test_two_agents_in_one_process_count_separately(metrics):
    other = Metrics()
    other.frames.inc()
    assert "edge_agent_frames_total 0.0" in scrape(metrics.serve("127.0.0.1:0")).splitlines()


def test_stop_releases_the_port(metrics):
    port = metrics.serve("127.0.0.1:0")
    metrics.stop()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_non_loopback_address_is_allowed_with_a_warning(metrics, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_agent.metrics"):
        port = metrics.serve("0.0.0.0:0")
    assert "reachable from the network" in caplog.text
    assert "edge_agent_frames_total" in scrape(port)


def test_loopback_addresses_serve_without_a_warning(metrics, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_agent.metrics"):
        metrics.serve("localhost:0")
    assert caplog.text == ""


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1", ":9464", "127.0.0.1:http", "127.0.0.1:70000", "[::1:9464"])
def test_a_malformed_listen_address_is_a_user_error(metrics, listen):
    with pytest.raises(UserError, match=r"metrics.listen .*expected host:port"):
        metrics.serve(listen)


def test_a_port_already_in_use_is_a_user_error(metrics):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"metrics.listen '127.0.0.1:{port}': cannot listen there"):
            metrics.serve(f"127.0.0.1:{port}")
