"""The stateful language session (the engine's on devices other than the CPU): the prefix and all questions in
one pass, and the same logits as a forked batch."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from edge_agent.engine.devices import compile_properties
from edge_agent.engine.language import (
    ATTENTION_ALLOWED,
    LOGITS_POSITIONS,
    StatefulLanguageModel,
    StatefulSession,
    add_attention_allowed,
    add_logits_positions,
)
from tests.support.language import (
    QUESTION_LENGTHS,
    CountingRequest,
    embeddings,
    frame_inputs,
    gathers_of_logits_positions,
    rounds,
)


def compiled_language_model(model_dir, shared_sequence: bool) -> ov.CompiledModel:
    core = ov.Core()
    graph = core.read_model(model_dir / "openvino_language_model.xml")
    assert add_logits_positions(graph)
    if shared_sequence:
        assert add_attention_allowed(graph)
    return core.compile_model(graph, "CPU", compile_properties("CPU", "f32"))


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def model_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_fp32")


@pytest.fixture(scope="module")
def compiled(model_dir) -> dict[bool, ov.CompiledModel]:
    """The model compiled with the mask edit (one shared sequence) and without it (forked rows)."""
    return {shared: compiled_language_model(model_dir, shared) for shared in (True, False)}


def test_the_exported_graphs_take_both_edits(model_dir):
    names = {name for port in compiled_language_model(model_dir, True).inputs for name in port.get_names()}
    assert {ATTENTION_ALLOWED, LOGITS_POSITIONS} <= names


def test_the_last_layer_after_its_attention_runs_only_at_the_logits_positions(model_dir):
    """The rows are gathered before the last layer's output projection and residual add, not the LM head."""
    graph = ov.Core().read_model(model_dir / "openvino_language_model.xml")
    assert add_logits_positions(graph)
    assert gathers_of_logits_positions(graph) == ["Add", "MatMul"]


def test_logits_at_the_positions_equal_the_unedited_graphs(model_dir):
    core = ov.Core()
    unedited = core.compile_model(model_dir / "openvino_language_model.xml", "CPU", compile_properties("CPU", "f32"))
    edited = compiled_language_model(model_dir, shared_sequence=False)
    _, prefix, _ = frame_inputs(edited, seed=3, prefix_tokens=21)
    inputs = {
        "inputs_embeds": prefix,
        "attention_mask": np.ones((1, 21), dtype=np.int64),
        "position_ids": np.arange(21)[None],
        "beam_idx": np.zeros(1, dtype=np.int32),
    }
    positions = np.array([20, 3, 11])
    everywhere = unedited.create_infer_request().infer(inputs)["logits"]
    gathered = edited.create_infer_request().infer({**inputs, LOGITS_POSITIONS: positions})["logits"]
    np.testing.assert_allclose(gathered, everywhere[:, positions], atol=1e-4)


def test_one_shared_sequence_equals_a_batch_of_forked_rows(compiled):
    _, prefix, questions = frame_inputs(compiled[True], seed=0, prefix_tokens=23)
    for cached_prefix in (False, True):
        one = StatefulSession(StatefulLanguageModel(compiled[True]), prefix)
        other = StatefulSession(StatefulLanguageModel(compiled[False]), prefix)
        if cached_prefix:
            one.prefill_prefix()
        for first, second in zip(
            rounds(one, questions, 3, np.random.default_rng(1)), rounds(other, questions, 3, np.random.default_rng(1))
        ):
            np.testing.assert_allclose(first, second, atol=1e-4)


def test_decode_steps_keep_one_cache_row_while_rows_leave(compiled):
    """Rows drop out step by step (as finished answers do) with the same logits as forked rows."""
    _, prefix, questions = frame_inputs(compiled[True], seed=8, prefix_tokens=27)
    schedule = [[0, 1, 2, 3], [0, 2, 3], [1, 2], [0, 1], [1]]  # each: indices into the last step's rows
    model = StatefulLanguageModel(compiled[True])
    model.request = CountingRequest(model.request)
    logits = {}
    for shared, session in (
        (True, StatefulSession(model, prefix)),
        (False, StatefulSession(StatefulLanguageModel(compiled[False]), prefix)),
    ):
        rng = np.random.default_rng(9)
        session.prefill_questions(questions)
        logits[shared] = [
            session.step(embeddings(rng, len(rows), 1, prefix.shape[2]), np.array(rows)) for rows in schedule
        ]
    for first, second in zip(logits[True], logits[False]):
        np.testing.assert_allclose(first, second, atol=1e-4)
    steps = model.request.calls[1:]
    assert [call["inputs_embeds"].shape[:2] for call in steps] == [(1, len(rows)) for rows in schedule]
    assert all(len(call["beam_idx"]) == 1 for call in steps)


def test_branches_score_the_same_as_extra_forked_rows(compiled):
    rng, prefix, questions = frame_inputs(compiled[True], seed=5, prefix_tokens=19)
    hidden = prefix.shape[2]
    branches = [(1, embeddings(rng, 3, hidden)), (1, embeddings(rng, 1, hidden)), (2, embeddings(rng, 2, hidden))]
    one = StatefulSession(StatefulLanguageModel(compiled[True]), prefix).prefill_questions(questions, branches)
    other = StatefulSession(StatefulLanguageModel(compiled[False]), prefix).prefill_questions(questions, branches)
    np.testing.assert_allclose(one[0], other[0], atol=1e-4)
    for first, second in zip(one[1], other[1]):
        np.testing.assert_allclose(first, second, atol=1e-4)


def test_later_rounds_see_the_prefix_and_not_the_earlier_rounds(compiled):
    _, prefix, questions = frame_inputs(compiled[True], seed=2, prefix_tokens=17)
    session = StatefulSession(StatefulLanguageModel(compiled[True]), prefix)
    first = rounds(session, questions, 2, np.random.default_rng(3))
    assert session.leftover_positions > 0
    again = rounds(session, questions[::-1], 2, np.random.default_rng(3))
    np.testing.assert_allclose(again[0], first[0][::-1], atol=1e-4)


def test_the_first_round_prefills_prefix_and_questions_in_one_call(compiled):
    rng, prefix, questions = frame_inputs(compiled[True], seed=4, prefix_tokens=30)
    hidden = prefix.shape[2]
    model = StatefulLanguageModel(compiled[True])
    model.request = CountingRequest(model.request)
    session = StatefulSession(model, prefix)
    calls = model.request.calls
    branches = [(0, embeddings(rng, 2, hidden)), (3, embeddings(rng, 1, hidden))]
    logits, ahead = session.prefill_questions(questions, branches)
    assert len(calls) == 1
    assert calls[0]["inputs_embeds"].shape[1] == 30 + sum(QUESTION_LENGTHS) + 3
    assert logits.shape[0] == len(QUESTION_LENGTHS) and [len(a) for a in ahead] == [2, 1]
    assert session.prefix_len == 30 and session.leftover_positions == sum(QUESTION_LENGTHS) + 3


def test_sessions_take_turns_on_one_cache_and_restart_when_another_used_it(compiled):
    _, prefix, questions = frame_inputs(compiled[True], seed=6, prefix_tokens=21)
    _, other_prefix, _ = frame_inputs(compiled[True], seed=7, prefix_tokens=25)
    model = StatefulLanguageModel(compiled[True])
    session, other = StatefulSession(model, prefix), StatefulSession(model, other_prefix)
    first = session.prefill_questions(questions)[0]
    other.prefill_questions(questions)
    assert session.leftover_positions == 0  # its cache is gone ...
    np.testing.assert_allclose(session.prefill_questions(questions)[0], first, atol=1e-4)  # ... and comes back
    assert model.cache_owner is session
