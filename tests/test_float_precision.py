"""Intel CPUs with AVX-512 BF16 but no AMX compute in f32 instead of the CPU plugin's bf16; others keep it."""

import openvino as ov
import pytest

from edge_agent.engine import Engine, int8_activations
from edge_agent.engine.devices import compile_properties
from edge_agent.engine.float_precision import float_precision
from tests.support.cpu import AVX512_VNNI_BF16, WITH_AMX
from tests.support.cpu import submodel_graph as graph

INTEL, AMD = "GenuineIntel", "AuthenticAMD"
WITHOUT_BF16 = frozenset({"avx2", "avx512f", "avx512_vnni"})


@pytest.mark.parametrize("flags, vendor, expected", [
    (AVX512_VNNI_BF16, INTEL, "f32"),  # Cooper Lake, or a Xeon whose AMX the hypervisor hides
    (WITH_AMX, INTEL, None),
    (AVX512_VNNI_BF16, AMD, None),  # Zen 4 and later: fast bf16 dot products
    (WITHOUT_BF16, INTEL, None),  # no bf16 arithmetic: the plugin computes in f32 anyway
    (frozenset(), "", None),  # /proc/cpuinfo unreadable
])
def test_f32_only_where_bf16_is_slower(flags, vendor, expected):
    assert float_precision(flags, vendor) == expected


@pytest.fixture
def intel_without_amx(monkeypatch):
    fields = {"flags": " ".join(AVX512_VNNI_BF16), "vendor_id": INTEL}
    monkeypatch.setattr(int8_activations, "cpuinfo_field", fields.get)


def test_f32_keeps_int8_activations_and_caches_in_f32(intel_without_amx, tiny_llava_int4):
    language = compile_properties("CPU", None, graph(tiny_llava_int4, "language_model"))
    assert language["INFERENCE_PRECISION_HINT"] == "f32"
    assert language["KV_CACHE_PRECISION"] == "f32"
    assert language["DYNAMIC_QUANTIZATION_GROUP_SIZE"] > 0
    vision = compile_properties("CPU", None, graph(tiny_llava_int4, "vision_embeddings_model"))
    assert vision["INFERENCE_PRECISION_HINT"] == "f32" and "KV_CACHE_PRECISION" not in vision


def test_a_pinned_precision_wins(intel_without_amx, tiny_llava_int4):
    language = graph(tiny_llava_int4, "language_model")
    assert compile_properties("CPU", "bf16", language)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert compile_properties("CPU", "bf16", language)["KV_CACHE_PRECISION"] == "bf16"
    assert compile_properties("CPU", "f32", language)["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0


def test_the_engine_compiles_with_this_cpus_precision(tiny_llava_int4):
    engine = Engine.load(tiny_llava_int4)
    expected = float_precision() or ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    for compiled in (engine._vision, engine._language.compiled):
        assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == expected
