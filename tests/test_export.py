"""`export_model`: the OpenVINO directory it writes, how it compresses weights, and the mistakes it reports."""

import json
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import openvino as ov
import pytest

from edge_agent.cli import main
from edge_agent.devtools import scenes
from edge_agent.engine import Engine, Prompt
from edge_agent.errors import UserError
from edge_agent.export import (
    MAX_CALIBRATION_FRAMES,
    calibration_samples,
    export_model,
    find_calibration_frames,
    staged_output_dir,
    weight_compression,
)
from tests.support.videos import write_video

EXPORTED_FILES = {
    "openvino_language_model.xml",
    "openvino_language_model.bin",
    "openvino_vision_embeddings_model.xml",
    "openvino_vision_embeddings_model.bin",
    "openvino_text_embeddings_model.xml",
    "openvino_text_embeddings_model.bin",
    "openvino_tokenizer.xml",
    "openvino_tokenizer.bin",
    "openvino_detokenizer.xml",
    "openvino_detokenizer.bin",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "edge_agent_export.json",
}
LOW_PRECISION = {"u4", "i4", "u8", "i8"}


def weight_types(model_xml):
    """Element types of the model's weight constants (those with more than a handful of values)."""
    model = ov.Core().read_model(model_xml)
    return {
        op.get_output_element_type(0).get_type_name()
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
        and op.get_output_partial_shape(0).is_static
        and np.prod(op.get_output_shape(0)) >= 64
    }


def generate_with_genai(model_dir, question="Is the door open?"):
    import openvino_genai

    pipeline = openvino_genai.VLMPipeline(str(model_dir), "CPU", INFERENCE_PRECISION_HINT="f32")
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = 5
    image = ov.Tensor(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return pipeline.generate(question, images=[image], generation_config=config)


def test_fp32_export_has_the_openvino_layout_and_a_standalone_image_processor(tiny_llava_fp32):
    assert EXPORTED_FILES <= {path.name for path in tiny_llava_fp32.iterdir()}
    processor = json.loads((tiny_llava_fp32 / "processor_config.json").read_text())
    preprocessor = json.loads((tiny_llava_fp32 / "preprocessor_config.json").read_text())
    assert preprocessor == processor["image_processor"]
    assert preprocessor["crop_size"] == {"height": 32, "width": 32}
    assert weight_types(tiny_llava_fp32 / "openvino_language_model.xml") == {"f32"}


def test_export_records_source_options_and_versions(tiny_llava_int4, tiny_llava_checkpoint):
    metadata = json.loads((tiny_llava_int4 / "edge_agent_export.json").read_text())
    assert metadata["source"] == str(tiny_llava_checkpoint)
    assert metadata["weight_format"] == "int4"
    assert metadata["language_model_compression"] == {"bits": 4, "sym": False, "group_size": 32, "ratio": 1.0}
    assert metadata["text_embeddings_compression"] == {"bits": 8, "sym": True, "group_size": -1}
    assert metadata["vision_quantization"] == {"bits": 8, "sym": True, "group_size": -1}
    assert metadata["versions"]["openvino"] == ov.__version__.split("-")[0]
    assert metadata["exported_at"].startswith("20")


def test_int4_compresses_the_language_model_to_4_bits_and_the_embeddings_to_8(tiny_llava_int4):
    assert {"u4", "i4"} & weight_types(tiny_llava_int4 / "openvino_language_model.xml")
    for embeddings in ("openvino_vision_embeddings_model.xml", "openvino_text_embeddings_model.xml"):
        types = weight_types(tiny_llava_int4 / embeddings) & LOW_PRECISION
        assert types == {"i8"}, embeddings


def test_int8_compresses_every_model_to_8_bits(tiny_llava_int8):
    for model in ("language_model", "vision_embeddings_model", "text_embeddings_model"):
        types = weight_types(tiny_llava_int8 / f"openvino_{model}.xml") & LOW_PRECISION
        assert types and types <= {"u8", "i8"}, model


@pytest.mark.parametrize("fixture", ["tiny_llava_fp32", "tiny_llava_int4", "tiny_llava_next_fp32"])
def test_exports_run_in_openvino_genai(request, fixture):
    result = generate_with_genai(request.getfixturevalue(fixture))
    assert len(result.texts) == 1 and result.texts[0]


def test_a_group_size_that_does_not_fit_names_the_option_to_change(tiny_llava_checkpoint, tmp_path, capsys):
    with pytest.raises(UserError, match="group_size: 128 .* --group-size 64"):
        export_model(str(tiny_llava_checkpoint), tmp_path / "out", weight_format="int4")
    assert not (tmp_path / "out").exists()
    assert "exporting to OpenVINO:" in capsys.readouterr().err


def test_source_that_is_neither_a_directory_nor_a_hub_id(tmp_path):
    with pytest.raises(UserError, match="neither an existing directory nor a valid"):
        export_model(str(tmp_path / "missing" / "model"), tmp_path / "out")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        export_model(str(tmp_path), tmp_path / "out")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(UserError, match="'llava_onevision' is not supported; supported: llava, llava_next"):
        export_model(str(tmp_path), tmp_path / "out")


def test_hub_id_in_offline_mode_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot download edge-agent-tests/no-such-llava: no network access"):
        export_model("edge-agent-tests/no-such-llava", tmp_path / "out")
    assert time.monotonic() - started < 30


def test_hub_id_with_an_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot download org/model: no network access .* pass the local directory"):
        export_model("org/model", tmp_path / "out")
    assert time.monotonic() - started < 30


def test_non_empty_output_needs_overwrite(tiny_llava_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_model(str(tiny_llava_checkpoint), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(weight_format="int3"), "weight_format: unsupported 'int3'"),
        (dict(weight_format="fp16", group_size=64), "only apply to weight_format int4"),
        (dict(weight_format="fp32", sym=True), "sym: only applies"),
        (dict(weight_format="int4", group_size=0), "group_size: must be"),
        (dict(weight_format="int4", ratio=1.5), r"ratio: must be in \(0, 1\]"),
    ],
)
def test_invalid_compression_options(options, message):
    options = dict(dict(group_size=None, ratio=None, sym=False), **options)
    with pytest.raises(UserError, match=message):
        weight_compression(**options)


def test_int4_defaults_match_optimum_cli():
    assert weight_compression("int4", None, None, False) == {"bits": 4, "sym": False, "group_size": 128, "ratio": 1.0}


def test_output_replaces_the_old_directory_only_after_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_output_dir(out, overwrite=True) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("build failed")
    assert [path.name for path in out.iterdir()] == ["old.txt"]

    with staged_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [path.name for path in out.iterdir()] == ["new.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_importing_the_export_module_loads_no_heavy_library():
    code = (
        "import sys, edge_agent.export; "
        "print(sorted(m for m in ('torch', 'optimum', 'nncf', 'transformers') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"


# -- calibrated INT8 vision encoder ------------------------------------------------------------------------


def write_scene_images(directory, count, seed=0, suffix=".png"):
    """`count` camera-like frames of the synthetic kiosk room, as the user's own images would be."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        cv2.imwrite(str(directory / f"frame{index:03d}{suffix}"), scenes.render(scenes.random_scene(rng), 64, 48, rng))
    return directory


@pytest.fixture(scope="module")
def calibrated_int4(tiny_llava_checkpoint, tmp_path_factory):
    """tiny llava: int4 language model, vision encoder fully INT8 calibrated on 12 scene images."""
    images = write_scene_images(tmp_path_factory.mktemp("calibration"), 12)
    return export_model(
        str(tiny_llava_checkpoint),
        tmp_path_factory.mktemp("export") / "calibrated",
        weight_format="int4",
        group_size=32,
        calibration_images=images,
        progress=False,
    )


def activation_fake_quantizes(model_xml):
    """FakeQuantize nodes on activations (their data input is computed, not a weight constant)."""
    model = ov.Core().read_model(model_xml)
    return [
        op
        for op in model.get_ops()
        if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() != "Constant"
    ]


def int8_matmul_layers(model_xml):
    """Layers the CPU plugin runs in 8-bit integer precision once the model is compiled."""
    runtime = ov.Core().compile_model(str(model_xml), "CPU").get_runtime_model()
    return [
        op
        for op in runtime.get_ops()
        if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "Convolution")
        and op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8")
    ]


def vision_outputs(model_dir, samples):
    compiled = ov.Core().compile_model(
        str(model_dir / "openvino_vision_embeddings_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    return np.concatenate([compiled(sample)[0] for sample in samples])


def test_calibrated_export_quantizes_vision_activations_to_int8(calibrated_int4, tiny_llava_int4):
    vision = "openvino_vision_embeddings_model.xml"
    assert activation_fake_quantizes(calibrated_int4 / vision)
    assert int8_matmul_layers(calibrated_int4 / vision)
    assert not activation_fake_quantizes(tiny_llava_int4 / vision)  # weight-only compression quantizes no activation
    assert weight_types(calibrated_int4 / vision) & LOW_PRECISION == {"i8"}


def test_calibration_keeps_the_language_model_weight_format(calibrated_int4):
    assert {"u4", "i4"} & weight_types(calibrated_int4 / "openvino_language_model.xml")
    assert not activation_fake_quantizes(calibrated_int4 / "openvino_language_model.xml")


def test_calibrated_encoder_stays_close_to_float_on_frames_it_never_saw(calibrated_int4, tiny_llava_fp32, tmp_path):
    unseen = find_calibration_frames(write_scene_images(tmp_path, 10, seed=99))
    samples = calibration_samples(tiny_llava_fp32, unseen)
    reference = vision_outputs(tiny_llava_fp32, samples)
    error = np.linalg.norm(vision_outputs(calibrated_int4, samples) - reference) / np.linalg.norm(reference)
    assert error < 0.15


def test_calibrated_export_loads_in_the_engine_and_answers(calibrated_int4):
    engine = Engine.load(calibrated_int4)
    frame = scenes.render(scenes.SyntheticScene(True, 1, "red", None), 64, 48, np.random.default_rng(3))
    context = engine.encode(frame)
    free, constrained = engine.answer(
        context, [Prompt("Is the door open?", 3, ignore_eos=True), Prompt("Is it?", options=("Yes", "No"))]
    )
    assert len(free.token_ids) == 3
    assert constrained.text in ("Yes", "No") and 0 < constrained.confidence <= 1


def test_calibrated_export_records_the_recipe(calibrated_int4):
    metadata = json.loads((calibrated_int4 / "edge_agent_export.json").read_text())
    assert metadata["weight_format"] == "int4"
    assert metadata["language_model_compression"]["bits"] == 4
    recipe = metadata["vision_quantization"]
    assert recipe["bits"] == 8 and recipe["activations"] is True and recipe["method"] == "nncf.quantize"
    assert recipe["calibration"]["frames"] == 12 and recipe["calibration"]["samples"] == 12


def test_calibration_preprocesses_like_the_engine_with_one_sample_per_anyres_tile(tiny_llava_next_fp32, tmp_path):
    calibration = find_calibration_frames(write_scene_images(tmp_path, 10))
    samples = calibration_samples(tiny_llava_next_fp32, calibration)
    engine = Engine.load(tiny_llava_next_fp32)
    expected = np.concatenate([engine.preprocess(image).pixel_values for image in calibration.images()])
    assert len(samples) == len(expected) > len(calibration.frames)
    np.testing.assert_array_equal(np.concatenate(samples), expected)


def test_videos_give_evenly_spaced_calibration_frames(tmp_path):
    write_video(tmp_path / "short.mp4", seconds=1.5, fps=10)
    write_video(tmp_path / "long.avi", seconds=30, fps=10)
    calibration = find_calibration_frames(tmp_path)
    by_video = {
        path.name: [frame.index for frame in calibration.frames if frame.path == path]
        for path in (tmp_path / "short.mp4", tmp_path / "long.avi")
    }
    assert len(calibration.frames) == MAX_CALIBRATION_FRAMES
    assert by_video["long.avi"][0] == 0 and by_video["short.mp4"][-1] == 14  # files in name order
    assert set(np.diff(by_video["long.avi"])) <= {2, 3}  # 315 frames in all, about every 2.5th kept
    images = list(calibration.images())
    assert len(images) == MAX_CALIBRATION_FRAMES and all(image.shape == (120, 160, 3) for image in images)


def test_images_in_subdirectories_count_and_unreadable_files_are_skipped(tmp_path):
    write_scene_images(tmp_path / "monday", 6, suffix=".jpg")
    write_scene_images(tmp_path / "tuesday", 6, seed=1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("taken at the front desk")
    calibration = find_calibration_frames(tmp_path)
    assert len(calibration.frames) == 12 and all(frame.index is None for frame in calibration.frames)


def test_calibration_directory_errors_come_before_the_export(tiny_llava_checkpoint, tmp_path, capsys):
    with pytest.raises(UserError, match=r"calibration_images: \S+/missing does not exist"):
        export_model(str(tiny_llava_checkpoint), tmp_path / "out", calibration_images=tmp_path / "missing")
    assert "exporting" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "a.txt").write_text("x"), "is not a directory"),
        (lambda d: None, "holds no readable images"),
        (lambda d: (d / "corrupt.jpg").write_bytes(b"\xff\xd8 not really"), "holds no readable images"),
        (lambda d: write_scene_images(d, 4), "holds 4 readable frames; calibration needs at least 10"),
    ],
)
def test_unusable_calibration_directories(tmp_path, make, message):
    directory = tmp_path / "images"
    directory.mkdir()
    make(directory)
    with pytest.raises(UserError, match=message):
        find_calibration_frames(directory / "a.txt" if message == "is not a directory" else directory)


def test_cli_reports_a_bad_calibration_directory_in_one_line(tiny_llava_checkpoint, tmp_path, capsys):
    code = main(
        ["model", "export", str(tiny_llava_checkpoint), str(tmp_path / "out"), "--calibration-images", str(tmp_path)]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"edge-agent: error: calibration_images: {tmp_path} holds no readable images "
        "(.jpg .jpeg .png .bmp .webp .tif .tiff) or videos (.mp4 .avi .mkv .mov .webm .m4v)"
    ]
