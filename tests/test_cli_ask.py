"""`edge-agent ask --image`: answers as JSON lines, bad input as one clear line, and no torch at run time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from edge_agent.engine import Engine, Prompt


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "frame.png"
    rng = np.random.default_rng(3)
    cv2.imwrite(str(path), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    return path


def test_ask_prints_one_json_object_per_question_with_the_engines_answers(tiny_llava_fp32, image_file):
    questions = ["Is the door open?", "How many people are there?", "What is on the counter?"]
    result = run_cli(
        "ask",
        questions[0],
        "-q",
        questions[1],
        "--question",
        questions[2],
        "--image",
        str(image_file),
        "--model",
        str(tiny_llava_fp32),
        "--precision",
        "f32",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["question"] for line in lines] == questions
    engine = Engine.load(tiny_llava_fp32, inference_precision="f32")
    expected = engine.answer(engine.encode(cv2.imread(str(image_file))), [Prompt(q, 6) for q in questions])
    for line, answer in zip(lines, expected):
        assert line["token_ids"] == answer.token_ids
        assert line["answer"] == answer.text
        assert set(line["timings_ms"]) == {"preprocess", "vision", "prefix", "question_prefill", "decode"}


def test_ask_plain_output_shows_question_and_answer(tiny_llava_fp32, image_file):
    result = run_cli(
        "ask", "Is the door open?", "--image", str(image_file), "--model", str(tiny_llava_fp32), "--max-new-tokens", "3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Is the door open?"


def test_loading_and_answering_never_imports_torch_transformers_optimum_or_the_devtools(tiny_llava_int4, image_file):
    script = textwrap.dedent(f"""
        import sys
        from edge_agent.cli import main
        code = main(["ask", "Is the door open?", "--image", {str(image_file)!r}, "--model", {str(tiny_llava_int4)!r},
                     "--max-new-tokens", "2"])
        heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "optimum")
                       or name.startswith("edge_agent.devtools"))
        print("HEAVY", heavy)
        sys.exit(code)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def incomplete_copy(model_dir, tmp_path):
    copy = tmp_path / "incomplete"
    shutil.copytree(model_dir, copy)
    (copy / "openvino_language_model.xml").unlink()
    return copy


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing model", "does not exist"),
        ("incomplete model", "incomplete: missing openvino_language_model.xml"),
        ("missing image", "does not exist"),
        ("unreadable image", "cannot read image"),
        ("empty question", "a question is empty"),
        ("unknown device", "device 'XPU' for the vision encoder is not available"),
        ("npu language model", "not available"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_non_zero_exit(case, expected, tiny_llava_fp32, image_file, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    model, image, question, device = str(tiny_llava_fp32), str(image_file), "Is the door open?", "CPU"
    if case == "missing model":
        model = str(tmp_path / "no-such-model")
    elif case == "incomplete model":
        model = str(incomplete_copy(tiny_llava_fp32, tmp_path))
    elif case == "missing image":
        image = str(tmp_path / "no-such.png")
    elif case == "unreadable image":
        image = str(not_an_image)
    elif case == "empty question":
        question = "   "
    elif case == "unknown device":
        device = "XPU"
    elif case == "npu language model":
        device = "NPU"
    result = run_cli(
        "ask",
        question,
        "--image",
        image,
        "--model",
        model,
        "--device",
        device,
        "--config",
        str(tmp_path / "absent.yaml"),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-agent: error:") and expected in lines[0], result.stderr
