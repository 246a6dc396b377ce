"""The paged language model (the engine's on the CPU): the same logits as the stateful session, with the
prefix's blocks shared by every answer and each answer's blocks given back."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from edge_agent.engine.int8_activations import host_cpu_flags
from edge_agent.engine.kv_cache import BF16_FLAGS
from edge_agent.engine.language import StatefulLanguageModel
from edge_agent.engine.paged import PagedLanguageModel, load_language_model, to_paged_attention
from tests.support.cpu import submodel_graph
from tests.support.language import (
    QUESTION_LENGTHS,
    CountingRequest,
    embeddings,
    frame_inputs,
    gathers_of_logits_positions,
    rounds,
)

LONG_QUESTIONS = QUESTION_LENGTHS + [40]  # one question that spans blocks of its own
ATOL = 5e-4
"""f32 kernels of the two attentions round differently: up to 2e-4 apart after 40 steps, on logits up to 20."""


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def model_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_fp32")


@pytest.fixture(scope="module")
def models(model_dir) -> tuple[PagedLanguageModel, StatefulLanguageModel]:
    """The language model paged, as the engine loads it on the CPU, and stateful; both at f32."""
    core, path = ov.Core(), model_dir / "openvino_language_model.xml"
    paged = load_language_model(core, path, "CPU", "f32")
    assert isinstance(paged, PagedLanguageModel)
    return paged, StatefulLanguageModel.load(core, path, "CPU", "f32")


def counted(paged: PagedLanguageModel) -> list[dict]:
    """Record the model's calls from now on."""
    paged.request = CountingRequest(paged.request)
    return paged.request.calls


@pytest.fixture
def paged(models):
    model = models[0]
    request = model.request
    yield model
    model.request = request


@pytest.mark.parametrize("precision, cache", [("f32", "f32"), ("bf16", "bf16"), (None, "u8")])
def test_the_pool_reads_the_plugins_block_size_whatever_the_cache_layout(model_dir, precision, cache):
    """The CPU plugin's blocks hold 32 tokens; a u8 cache appends its scales to the key and value blocks."""
    if cache == "bf16" and not BF16_FLAGS & host_cpu_flags():
        pytest.skip("this CPU has no bf16 arithmetic")
    paged = load_language_model(
        ov.Core(), model_dir / "openvino_language_model.xml", "CPU", precision, KV_CACHE_PRECISION=cache
    )
    assert paged.compiled.input("key_cache.0").get_element_type().get_type_name() == cache
    assert paged.pool.block_size == 32


def test_a_paged_graph_the_plugin_refuses_falls_back_to_the_stateful_one(model_dir):
    """The plugin's paged attention takes no f32 cache under bf16 inference; its stateful attention does."""
    model = load_language_model(
        ov.Core(), model_dir / "openvino_language_model.xml", "CPU", "bf16", KV_CACHE_PRECISION="f32"
    )
    assert isinstance(model, StatefulLanguageModel)


@pytest.mark.parametrize("prefix_tokens", [23, 32, 45])
def test_paged_rounds_equal_the_stateful_session(models, prefix_tokens):
    """Prefixes shorter than a block, exactly one block and between: the last block is shared or copied.

    The long question and 40 decode steps cross block boundaries of their own.
    """
    paged, stateful = models
    _, prefix, questions = frame_inputs(
        models[1].compiled, seed=prefix_tokens, prefix_tokens=prefix_tokens, lengths=LONG_QUESTIONS
    )
    for cached_prefix in (False, True):
        one, other = paged.session(prefix), stateful.session(prefix)
        if cached_prefix:
            one.prefill_prefix()
        for first, second in zip(
            rounds(one, questions, 40, np.random.default_rng(1)), rounds(other, questions, 40, np.random.default_rng(1))
        ):
            np.testing.assert_allclose(first, second, atol=ATOL)


def test_rows_leave_step_by_step_with_the_stateful_sessions_logits(models):
    paged, stateful = models
    _, prefix, questions = frame_inputs(models[1].compiled, seed=8, prefix_tokens=27)
    schedule = [[0, 1, 2, 3], [0, 2, 3], [1, 2], [0, 1], [1]]  # each: indices into the last step's rows
    logits = []
    for model in (paged, stateful):
        rng = np.random.default_rng(9)
        session = model.session(prefix)
        session.prefill_questions(questions)
        logits.append(
            [session.step(embeddings(rng, len(rows), 1, prefix.shape[2]), np.array(rows)) for rows in schedule]
        )
    for first, second in zip(*logits):
        np.testing.assert_allclose(first, second, atol=ATOL)


def test_branches_score_as_in_the_stateful_session_and_leave_their_rows_as_they_were(models):
    """A question's first branch rides along in its sequence and further ones repeat the question; either
    way the rows decode afterwards as if no branch had been scored."""
    paged, stateful = models
    rng, prefix, questions = frame_inputs(models[1].compiled, seed=5, prefix_tokens=19)
    hidden = prefix.shape[2]
    branches = [(0, embeddings(rng, 3, hidden)), (1, embeddings(rng, 1, hidden)), (1, embeddings(rng, 2, hidden))]
    step = embeddings(rng, len(questions), 1, hidden)
    results = []
    for model in (paged, stateful):
        session = model.session(prefix)
        logits, ahead = session.prefill_questions(questions, branches)
        results.append((logits, ahead, session.step(step, np.arange(len(questions)))))
    (logits, ahead, stepped), (expected, expected_ahead, expected_step) = results
    np.testing.assert_allclose(logits, expected, atol=ATOL)
    assert [len(a) for a in ahead] == [3, 1, 2]
    for first, second in zip(ahead, expected_ahead):
        np.testing.assert_allclose(first, second, atol=ATOL)
    np.testing.assert_allclose(stepped, expected_step, atol=ATOL)


def test_a_new_frame_takes_two_calls_and_a_cached_prefix_one(models, paged):
    """The prefix goes in with the first question; the others follow it in one call, each after the prefix."""
    _, prefix, questions = frame_inputs(models[1].compiled, seed=4, prefix_tokens=30)
    calls = counted(paged)
    session = paged.session(prefix)
    session.prefill_questions(questions[:1])
    assert [len(call["inputs_embeds"]) for call in calls] == [30 + QUESTION_LENGTHS[0]]
    session.restart()
    calls.clear()
    session.prefill_questions(questions)
    assert [len(call["inputs_embeds"]) for call in calls] == [30 + QUESTION_LENGTHS[0], sum(QUESTION_LENGTHS[1:])]
    assert list(calls[1]["past_lens"]) == [30] * (len(questions) - 1)
    calls.clear()
    session.prefill_questions(questions)
    assert len(calls) == 1 and list(calls[0]["past_lens"]) == [30] * len(questions)


def test_answers_share_the_prefixs_full_blocks_and_own_the_rest(models, paged):
    _, prefix, questions = frame_inputs(models[1].compiled, seed=6, prefix_tokens=70)  # 2 full blocks and 6 tokens
    calls = counted(paged)
    paged.session(prefix).prefill_questions(questions)
    first, later = calls
    prefix_blocks = list(first["block_indices"][:3])
    tables = np.split(later["block_indices"], later["block_indices_begins"][1:-1])
    assert all(list(table[:2]) == prefix_blocks[:2] for table in tables)
    owned = [block for table in tables for block in table[2:]]
    assert len(owned) == len(set(owned)) and not set(owned) & set(prefix_blocks)


def test_every_round_gives_its_blocks_back(models, paged):
    _, prefix, questions = frame_inputs(models[1].compiled, seed=7, prefix_tokens=45, lengths=LONG_QUESTIONS)
    session = paged.session(prefix)
    for _ in range(2):  # the first round's first answer continues in the prefix's last block; later ones copy it
        rounds(session, questions, 35, np.random.default_rng(2))
    capacity = paged.pool.capacity
    for _ in range(3):
        rounds(session, questions, 35, np.random.default_rng(2))
    assert paged.pool.capacity == capacity
    session.prefill_prefix()
    assert paged.pool.free_blocks == paged.pool.capacity - 2  # the prefix's 2 blocks only


def test_sessions_take_turns_on_the_pool_and_restart_when_another_used_it(models):
    paged = models[0]
    _, prefix, questions = frame_inputs(models[1].compiled, seed=6, prefix_tokens=21)
    _, other_prefix, _ = frame_inputs(models[1].compiled, seed=7, prefix_tokens=25)
    session, other = paged.session(prefix), paged.session(other_prefix)
    first = rounds(session, questions, 3, np.random.default_rng(3))
    rounds(other, questions, 3, np.random.default_rng(3))
    assert paged.cache_owner is other
    again = rounds(session, questions, 3, np.random.default_rng(3))
    for a, b in zip(first, again):
        np.testing.assert_allclose(a, b, atol=ATOL)
    assert paged.cache_owner is session


def test_the_paged_graphs_last_layer_after_attention_runs_only_at_the_logits_positions(model_dir):
    graph = ov.Core().read_model(model_dir / "openvino_language_model.xml")
    assert to_paged_attention(graph)
    assert gathers_of_logits_positions(graph) == ["Add", "MatMul"]


def test_graphs_without_a_kv_cache_are_not_paged(tiny_llava_fp32):
    assert not to_paged_attention(submodel_graph(tiny_llava_fp32, "vision_embeddings_model"))


def test_the_paged_model_leaves_the_compiled_model_cache_alone(model_dir, tmp_path):
    """OpenVINO 2026.4 cannot import the blob it exports for a paged graph: writing it would only cost time."""
    core = ov.Core()
    core.set_property({"CACHE_DIR": str(tmp_path)})
    assert isinstance(load_language_model(core, model_dir / "openvino_language_model.xml", "CPU"), PagedLanguageModel)
    assert not list(tmp_path.iterdir())
