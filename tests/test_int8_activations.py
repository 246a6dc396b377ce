"""Compressed matmuls get int8 activations on CPUs with VNNI and without AMX, in groups their weights allow."""

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from edge_agent.engine import Engine
from edge_agent.engine.devices import compile_properties
from edge_agent.engine.int8_activations import activation_group, host_cpu_flags, weight_group_widths
from tests.support.cpu import AVX512_VNNI_BF16 as VNNI_WITHOUT_AMX
from tests.support.cpu import WITH_AMX, cosine
from tests.support.cpu import submodel_graph as graph

WITHOUT_VNNI = frozenset({"avx2", "avx512f"})


def test_the_group_follows_the_int4_weights_groups(tiny_llava_int4):
    language = graph(tiny_llava_int4, "language_model")
    assert 32 in weight_group_widths(language)  # exported with group size 32
    assert activation_group(language, VNNI_WITHOUT_AMX) == 32


def test_per_channel_weights_allow_any_group_dividing_their_input_width(tiny_llava_int8):
    language = graph(tiny_llava_int8, "language_model")
    assert weight_group_widths(language) == {64, 128}  # the tiny LM's hidden and MLP widths
    assert activation_group(language, VNNI_WITHOUT_AMX) == 64


def test_float_weights_leave_nothing_to_quantize(tiny_llava_fp32):
    assert activation_group(graph(tiny_llava_fp32, "language_model"), VNNI_WITHOUT_AMX) is None


@pytest.mark.parametrize("flags", [WITH_AMX, WITHOUT_VNNI], ids=["amx", "no-vnni"])
def test_cpus_with_amx_or_without_vnni_keep_the_plugin_default(tiny_llava_int4, flags):
    assert activation_group(graph(tiny_llava_int4, "language_model"), flags) is None


def test_weight_widths_sharing_no_multiple_of_16_turn_it_off():
    activations = ops.parameter([-1, 24], ov.Type.f32)
    weights = ops.constant(np.ones((8, 24), dtype=np.uint8))
    decompressed = ops.multiply(ops.convert(weights, ov.Type.f32), ops.constant(np.full((8, 1), 0.5, np.float32)))
    model = ov.Model([ops.matmul(activations, decompressed, False, True)], [activations])
    assert weight_group_widths(model) == {24}
    assert activation_group(model, VNNI_WITHOUT_AMX) is None


def test_f32_keeps_activations_in_f32_and_other_devices_are_left_alone(tiny_llava_int4):
    language = graph(tiny_llava_int4, "language_model")
    assert compile_properties("CPU", "f32", language)["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0
    assert compile_properties("GPU", None, language) == {"PERFORMANCE_HINT": "LATENCY"}


def test_the_engine_compiles_each_submodel_with_its_group(tiny_llava_int8):
    engine = Engine.load(tiny_llava_int8)
    plugin_default = ov.Core().get_property("CPU", "DYNAMIC_QUANTIZATION_GROUP_SIZE")
    compiled_submodels = {"language_model": engine._language.compiled, "vision_embeddings_model": engine._vision}
    for submodel, compiled in compiled_submodels.items():
        expected = activation_group(graph(tiny_llava_int8, submodel)) or plugin_default
        assert compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == expected
    assert (
        Engine.load(tiny_llava_int8, inference_precision="f32")._language.compiled.get_property(
            "DYNAMIC_QUANTIZATION_GROUP_SIZE"
        )
        == 0
    )


def test_int8_activations_stay_close_to_float_ones(tiny_llava_int8):
    vision = graph(tiny_llava_int8, "vision_embeddings_model")
    if activation_group(vision) is None:
        relevant = host_cpu_flags() & (WITH_AMX | {"avx_vnni"})
        pytest.skip(f"this CPU keeps the plugin's default (flags: {' '.join(sorted(relevant)) or 'no VNNI'})")
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    core = ov.Core()
    float_activations = core.compile_model(vision, "CPU", {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})(pixels)[0]
    int8_activations = core.compile_model(vision, "CPU", compile_properties("CPU", None, vision))(pixels)[0]
    assert not np.array_equal(float_activations, int8_activations)  # the setting is in effect
    assert cosine(float_activations, int8_activations) > 0.999
