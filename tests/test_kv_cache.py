"""The language model's KV cache is kept in bf16 on CPUs with bf16 arithmetic, and answers stay close."""

import json

import numpy as np
import openvino as ov
import pytest

from edge_agent.engine import Engine
from edge_agent.engine.devices import compile_properties
from edge_agent.engine.int8_activations import host_cpu_flags
from edge_agent.engine.kv_cache import BF16_FLAGS, kv_cache_precision
from edge_agent.engine.language import StatefulLanguageModel
from edge_agent.engine.paged import load_language_model
from tests.support.cpu import AVX512_VNNI_BF16 as WITH_BF16
from tests.support.cpu import WITH_AMX, cosine
from tests.support.cpu import submodel_graph as graph

WITHOUT_BF16 = frozenset({"avx2", "avx512f", "avx512_vnni"})


@pytest.mark.parametrize("flags", [WITH_BF16, WITH_AMX], ids=["avx512-bf16", "amx"])
def test_a_stateful_language_model_gets_a_bf16_cache_where_the_cpu_has_bf16(tiny_llava_int4, flags):
    assert kv_cache_precision(graph(tiny_llava_int4, "language_model"), flags) == "bf16"


def test_cpus_without_bf16_and_graphs_without_a_cache_keep_the_default(tiny_llava_int4):
    assert kv_cache_precision(graph(tiny_llava_int4, "language_model"), WITHOUT_BF16) is None
    assert kv_cache_precision(graph(tiny_llava_int4, "vision_embeddings_model"), WITH_BF16) is None


def test_f32_keeps_the_cache_in_f32_and_f16_leaves_it_to_the_plugin(tiny_llava_int4):
    language = graph(tiny_llava_int4, "language_model")
    assert compile_properties("CPU", "f32", language)["KV_CACHE_PRECISION"] == "f32"
    assert "KV_CACHE_PRECISION" not in compile_properties("CPU", "f16", language)


def test_the_engine_compiles_its_language_model_with_the_chosen_cache(tiny_llava_int4):
    compiled = Engine.load(tiny_llava_int4)._language.compiled
    plugin_default = ov.Core().get_property("CPU", "KV_CACHE_PRECISION")
    expected = kv_cache_precision(graph(tiny_llava_int4, "language_model"))
    assert compiled.get_property("KV_CACHE_PRECISION") == (ov.Type.bf16 if expected else plugin_default)


def decoded_logits(model_dir, load=load_language_model, inference_precision=None, **properties) -> np.ndarray:
    """The logits of 4 questions' prefill and 6 decode steps, all rows in one step, after a 40-token prefix,
    of the language model as `load` compiles it (the engine's, paged on the CPU, by default)."""
    model = load(ov.Core(), model_dir / "openvino_language_model.xml", "CPU", inference_precision, **properties)
    hidden = json.loads((model_dir / "config.json").read_text())["text_config"]["hidden_size"]
    rng = np.random.default_rng(0)
    session = model.session(rng.standard_normal((1, 40, hidden), np.float32))
    seen = [session.prefill_questions(list(rng.standard_normal((4, 6, hidden), np.float32)))[0]]
    for _ in range(6):
        seen.append(session.step(rng.standard_normal((4, 1, hidden), np.float32), np.arange(4)))
    return np.stack(seen)


def test_a_bf16_cache_keeps_what_an_f32_cache_keeps_better_than_u8(tiny_llava_int4):
    """Under bf16 inference the keys and values are computed in bf16, so a bf16 cache loses little or nothing;
    the plugin's u8 default rounds them to 256 levels per token and head. Compared in the stateful graph, the
    one whose attention takes an f32 cache under bf16 inference."""
    if not BF16_FLAGS & host_cpu_flags():
        pytest.skip("this CPU has no bf16 arithmetic and keeps the plugin's u8 cache")
    f32 = decoded_logits(tiny_llava_int4, StatefulLanguageModel.load, KV_CACHE_PRECISION="f32")
    u8 = decoded_logits(tiny_llava_int4, StatefulLanguageModel.load, KV_CACHE_PRECISION="u8")
    bf16 = decoded_logits(tiny_llava_int4, StatefulLanguageModel.load)
    assert not np.array_equal(u8, bf16)  # the setting is in effect
    assert cosine(f32, bf16) > 0.9999
    assert cosine(f32, bf16) >= cosine(f32, u8)
    assert (f32.argmax(-1) == bf16.argmax(-1)).mean() >= (f32.argmax(-1) == u8.argmax(-1)).mean()


def test_the_paged_bf16_cache_stays_as_close_to_f32_inference_as_the_stateful_one(tiny_llava_int4):
    """Compared answer by answer: the two graphs' attention kernels round differently in bf16, and on this tiny
    random-weight model one answer's step can stray to a cosine of 0.975 in either (on a Xeon with AMX, the
    paged one's), enough to move a cosine over all the logits by 1e-3. A paged-graph bug would move them all."""
    if not BF16_FLAGS & host_cpu_flags():
        pytest.skip("this CPU has no bf16 arithmetic and keeps the plugin's u8 cache")
    truth = decoded_logits(tiny_llava_int4, inference_precision="f32")
    paged = decoded_logits(tiny_llava_int4)
    stateful = decoded_logits(tiny_llava_int4, StatefulLanguageModel.load)
    paged_u8 = decoded_logits(tiny_llava_int4, KV_CACHE_PRECISION="u8")
    assert typical_cosine(truth, paged) > typical_cosine(truth, stateful) - 1e-3
    assert typical_cosine(truth, paged) >= typical_cosine(truth, paged_u8)


def typical_cosine(truth: np.ndarray, logits: np.ndarray) -> float:
    """The median over every step and answer row of the cosine between their logits and the truth's."""
    vocabulary = truth.shape[-1]
    return float(
        np.median([cosine(*answer) for answer in zip(truth.reshape(-1, vocabulary), logits.reshape(-1, vocabulary))])
    )
