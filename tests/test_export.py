"""`export_model`: the OpenVINO directory it writes, how it compresses weights, and the mistakes it reports."""

import json
import socket
import subprocess
import sys
import time

import numpy as np
import openvino as ov
import pytest

from edge_agent.errors import UserError
from edge_agent.export import export_model, staged_output_dir, weight_compression

EXPORTED_FILES = {
    "openvino_language_model.xml", "openvino_language_model.bin",
    "openvino_vision_embeddings_model.xml", "openvino_vision_embeddings_model.bin",
    "openvino_text_embeddings_model.xml", "openvino_text_embeddings_model.bin",
    "openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin",
    "config.json", "generation_config.json", "chat_template.jinja", "processor_config.json",
    "preprocessor_config.json", "edge_agent_export.json",
}
LOW_PRECISION = {"u4", "i4", "u8", "i8"}


def weight_types(model_xml):
    """Element types of the model's weight constants (those with more than a handful of values)."""
    model = ov.Core().read_model(model_xml)
    return {op.get_output_element_type(0).get_type_name() for op in model.get_ops()
            if op.get_type_name() == "Constant" and op.get_output_partial_shape(0).is_static
            and np.prod(op.get_output_shape(0)) >= 64}


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
    assert metadata["embeddings_compression"]["bits"] == 8
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


def test_calibration_images_are_refused_rather_than_ignored(tiny_llava_checkpoint, tmp_path):
    with pytest.raises(UserError, match="not supported yet"):
        export_model(str(tiny_llava_checkpoint), tmp_path / "out", calibration_images=[tmp_path])


@pytest.mark.parametrize(("options", "message"), [
    (dict(weight_format="int3"), "weight_format: unsupported 'int3'"),
    (dict(weight_format="fp16", group_size=64), "only apply to weight_format int4"),
    (dict(weight_format="fp32", sym=True), "sym: only applies"),
    (dict(weight_format="int4", group_size=0), "group_size: must be"),
    (dict(weight_format="int4", ratio=1.5), r"ratio: must be in \(0, 1\]"),
])
def test_invalid_compression_options(options, message):
    options = dict(dict(group_size=None, ratio=None, sym=False), **options)
    with pytest.raises(UserError, match=message):
        weight_compression(**options)


def test_int4_defaults_match_optimum_cli():
    assert weight_compression("int4", None, None, False) == {"bits": 4, "sym": False, "group_size": 128,
                                                             "ratio": 1.0}


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
    code = ("import sys, edge_agent.export; "
            "print(sorted(m for m in ('torch', 'optimum', 'nncf', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"
