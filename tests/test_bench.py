"""`edge-agent bench` reports every stage, decode speed, the unchanged-scene cost, memory and start-up time.

Only the report's shape and consistency are checked: timings vary with the machine's load, so no test
asserts how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from edge_agent.devtools.bench import STAGES, format_report

QUESTIONS = 3
NEW_TOKENS = 4
FRAMES = 2


def edge_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled-cache")


@pytest.fixture(scope="module")
def report(tiny_llava_fp32, cache_dir) -> dict:
    done = edge_agent(
        "bench",
        "--model",
        str(tiny_llava_fp32),
        "--questions",
        str(QUESTIONS),
        "--new-tokens",
        str(NEW_TOKENS),
        "--frames",
        str(FRAMES),
        "--cache-dir",
        str(cache_dir),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_report_echoes_what_was_measured(report, tiny_llava_fp32):
    assert report["model"] == str(tiny_llava_fp32)
    assert report["device"] == "CPU"
    assert (report["questions"], report["new_tokens"], report["frames"]) == (QUESTIONS, NEW_TOKENS, FRAMES)
    assert report["answers"] == "free_text"


def test_shared_prefix_holds_the_prompt_text_and_the_image_tokens(report):
    assert report["prefix_tokens"] > 16  # 16 image tokens (32 px image, 8 px patches) after the prompt text


def test_every_stage_of_a_new_frame_takes_time(report):
    stages = report["stages_ms"]
    assert set(stages) == set(STAGES)
    assert all(stages[stage] > 0 for stage in ("preprocess", "vision", "prefix", "decode"))
    assert report["prefill_ms"] > 0  # prefix and questions in one pass; the questions' share is what the prefix
    # alone leaves of it, which on a tiny model is within noise of zero
    assert stages["question_prefill"] < report["prefill_ms"]


def test_a_new_frame_is_compared_with_its_vision_and_prefix_alone(report):
    assert report["frame_over_vision_and_prefix"] == pytest.approx(
        report["frame_ms"]["median"] / report["vision_and_prefix_ms"]
    )
    assert report["frame_over_vision_and_prefix"] > 1


def test_frame_median_lies_between_the_fastest_and_slowest_frame(report):
    frame = report["frame_ms"]
    assert 0 < frame["min"] <= frame["median"] <= frame["max"]


def test_decode_speed_counts_every_question_of_each_decode_step(report):
    decode_s = report["stages_ms"]["decode"] / 1000
    decode_steps = NEW_TOKENS - 1  # the first token of each answer comes from the question prefill
    assert report["decode"]["tokens_per_s"] == pytest.approx(QUESTIONS * decode_steps / decode_s)
    assert report["decode"]["step_ms"] == pytest.approx(report["stages_ms"]["decode"] / decode_steps)


def test_unchanged_scene_cost_is_reported_against_a_new_frame(report):
    assert report["unchanged_frame_ms"] > 0
    assert report["new_vs_unchanged_frame"] == pytest.approx(
        report["frame_ms"]["median"] / report["unchanged_frame_ms"]
    )


def test_memory_and_model_size_are_reported(report):
    assert report["peak_rss_mib"] > 0
    assert 0 < report["rss_after_frames_mib"] <= report["peak_rss_mib"]
    assert report["model_files_mib"] > 0


def test_peak_memory_is_the_process_own_not_its_parents():
    """Linux hands a spawned process its parent's `ru_maxrss`: a bench run started by a large process (a
    benchmark that has just exported its model) must still report its own peak."""
    parents_memory = b"\x01" * (600 * 2**20)  # written, so resident
    child = subprocess.run(
        [sys.executable, "-c", "from edge_agent.devtools.bench import peak_rss_mib; print(peak_rss_mib())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(parents_memory) and float(child.stdout) < 300


def test_first_answer_is_timed_with_a_cold_and_a_warm_compiled_model_cache(report, cache_dir):
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import openvino, paho.mqtt.client"], check=True)
    imports_s = time.monotonic() - started  # a floor: the agent's process has to import them too
    assert report["first_answer_s"]["cold_cache"] > 0.8 * imports_s
    assert report["first_answer_s"]["warm_cache"] > 0.8 * imports_s  # not the cold run's retained answer
    assert list(cache_dir.glob("*.blob")), "the measured engine keeps its compiled blobs in --cache-dir"
    assert not list(cache_dir.glob("bench-startup-*")), "the start-up runs' cache is removed afterwards"


def test_text_report_has_a_line_per_stage_and_the_headline_figures(report):
    text = format_report(report)
    for stage in STAGES:
        assert f"  {stage} " in text
    for heading in ("new frame", "decode", "unchanged", "peak RSS", "first answer"):
        assert any(line.startswith(heading) for line in text.splitlines())


def test_yes_no_questions_are_decided_without_free_decoding(tiny_llava_fp32):
    done = edge_agent(
        "bench", "--model", str(tiny_llava_fp32), "--questions", "2", "--yes-no", "--frames", "1", "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["answers"] == "yes_no"
    assert all(report["stages_ms"][stage] > 0 for stage in ("vision", "prefix"))
    assert report["prefill_ms"] > 0
    assert report["decode"] == {"tokens_per_s": None, "step_ms": None}
    assert "2 yes/no questions" in format_report(report)


def test_a_missing_model_directory_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    done = edge_agent("bench", "--model", str(missing))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and str(missing) in done.stderr


def test_zero_questions_is_refused_by_the_parser(tmp_path):
    done = edge_agent("bench", "--model", str(tmp_path), "--questions", "0")
    assert done.returncode == 2
    assert "must be a positive integer" in done.stderr
