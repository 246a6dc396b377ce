"""The engine answers exactly as Hugging Face transformers does, while encoding each frame only once."""

from __future__ import annotations

import gc
import threading

import numpy as np
import openvino as ov
import pytest

from edge_agent.engine import Engine, Prompt
from edge_agent.engine import engine as engine_module
from edge_agent.engine.devices import DevicePlan
from edge_agent.engine.language import StatefulLanguageModel
from edge_agent.engine.paged import load_language_model
from edge_agent.engine.preprocess import ClipPreprocessor
from edge_agent.errors import UserError
from tests.support.reference import random_frame

QUESTIONS = ["Is the door open?", "How many people are in the room?", "What color is the cup on the counter?"]
FRAME_SIZES = [(48, 64), (64, 48), (100, 37), (31, 90), (32, 32), (240, 320)]
MAX_NEW_TOKENS = 10


def free(questions: list[str], limit: int = MAX_NEW_TOKENS, ignore_eos: bool = False) -> list[Prompt]:
    """Free-text prompts for `questions`, each answered with up to `limit` tokens."""
    return [Prompt(question, limit, ignore_eos=ignore_eos) for question in questions]


@pytest.fixture(scope="module")
def llava(tiny_llava_fp32) -> Engine:
    return Engine.load(tiny_llava_fp32, inference_precision="f32")


@pytest.fixture(scope="module")
def llava_next(tiny_llava_next_fp32) -> Engine:
    return Engine.load(tiny_llava_next_fp32, inference_precision="f32")


@pytest.fixture(scope="module")
def grouped_llava(tiny_grouped_llava_fp32) -> Engine:
    """One layer of Qwen2-0.5B's attention layout: 7 query heads share each key/value head."""
    return Engine.load(tiny_grouped_llava_fp32, inference_precision="f32")


@pytest.fixture(params=["llava", "llava_next", "grouped_llava"])
def engine_and_reference(request):
    return request.getfixturevalue(request.param), request.getfixturevalue(f"hf_{request.param}")


@pytest.mark.parametrize("size", FRAME_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_batched_answers_equal_transformers_greedy_generate(engine_and_reference, size):
    engine, reference = engine_and_reference
    frame = random_frame(*size)
    answers = engine.answer(engine.encode(frame), free(QUESTIONS))
    for question, answer in zip(QUESTIONS, answers):
        assert answer.token_ids == reference.answer_ids(frame, question, MAX_NEW_TOKENS), question
        assert answer.text == engine.tokenizer.decode(answer.token_ids)


def test_answers_differ_between_frames_and_questions(llava):
    """Guards the parity test against a degenerate model that says the same thing whatever it sees."""
    first = llava.answer(llava.encode(random_frame(48, 64, seed=1)), free(QUESTIONS))
    second = llava.answer(llava.encode(random_frame(48, 64, seed=2)), free(QUESTIONS))
    assert len({tuple(a.token_ids) for a in first}) > 1
    assert [a.token_ids for a in first] != [a.token_ids for a in second]


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_many_questions_on_one_context_equal_each_alone(request, arch):
    engine = request.getfixturevalue(arch)
    context = engine.encode(random_frame(64, 48))
    together = engine.answer(context, free(QUESTIONS * 2))
    alone = [engine.answer(context, free([q]))[0] for q in QUESTIONS * 2]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]


@pytest.fixture(scope="module")
def stateful_llava(tiny_llava_fp32) -> Engine:
    """The engine with the stateful language model it runs on devices other than the CPU."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module, "load_language_model", StatefulLanguageModel.load)
        return Engine.load(tiny_llava_fp32, inference_precision="f32")


def test_stateful_fixture_runs_the_stateful_graph(stateful_llava, llava):
    assert type(stateful_llava._language) is StatefulLanguageModel
    assert type(llava._language) is not StatefulLanguageModel


def test_load_returns_while_the_language_model_compiles(tiny_llava_fp32, monkeypatch):
    """The first frame can be encoded meanwhile; the first use of the language model waits for it."""
    compiling, release = threading.Event(), threading.Event()

    def slow_compile(*args):
        compiling.set()
        release.wait(timeout=60)
        return load_language_model(*args)

    monkeypatch.setattr(engine_module, "load_language_model", slow_compile)
    try:
        engine = Engine.load(tiny_llava_fp32, inference_precision="f32")
        assert compiling.wait(timeout=10)
        assert not engine._language_compiling.done()
    finally:
        release.set()
    answer = engine.answer(engine.encode(random_frame(48, 64)), free(QUESTIONS[:1]))[0]
    assert len(answer.token_ids) > 0


def test_a_failed_language_model_compile_is_one_line_at_first_use(tiny_llava_fp32, monkeypatch):
    def failing_compile(*args):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:109:\nout of memory")

    monkeypatch.setattr(engine_module, "load_language_model", failing_compile)
    engine = Engine.load(tiny_llava_fp32, inference_precision="f32")
    with pytest.raises(UserError, match=r"^cannot load model .+: Exception from src/inference/src/cpp/core.cpp:109:$"):
        engine.encode(random_frame(48, 64))


@pytest.mark.parametrize("arch", ["llava", "stateful_llava"])
def test_a_context_serves_many_rounds_from_its_prefix(request, arch, monkeypatch):
    """Paged, each round's answers give their blocks back; stateful, later rounds mask out earlier ones until
    the leftovers outgrow the prefix and the session restarts from it."""
    engine = request.getfixturevalue(arch)
    context = engine.encode(random_frame(48, 64))
    restarts = []
    restart = context.session.restart
    monkeypatch.setattr(context.session, "restart", lambda: restarts.append(1) or restart())
    first = [a.token_ids for a in engine.answer(context, free(QUESTIONS))]
    assert not restarts  # a fresh context answers straight from its prefix
    for _ in range(4):
        again = [a.token_ids for a in engine.answer(context, free(QUESTIONS))]
        assert again == first
    assert bool(restarts) == (arch == "stateful_llava")


def test_the_stateful_model_answers_as_the_paged_one(llava, stateful_llava):
    frame = random_frame(64, 48)
    paged = llava.answer(llava.encode(frame), free(QUESTIONS * 2))
    stateful = stateful_llava.answer(stateful_llava.encode(frame), free(QUESTIONS * 2))
    assert [a.token_ids for a in stateful] == [a.token_ids for a in paged]


def test_contexts_take_turns_on_one_cache_and_keep_their_answers(llava):
    one, two = llava.encode(random_frame(48, 64, seed=3)), llava.encode(random_frame(48, 64, seed=4))
    first = [a.token_ids for a in llava.answer(one, free(QUESTIONS))]
    second = [a.token_ids for a in llava.answer(two, free(QUESTIONS))]
    assert first != second
    assert [a.token_ids for a in llava.answer(one, free(QUESTIONS))] == first


def test_encode_runs_the_vision_encoder_once_and_answer_never(llava, monkeypatch):
    calls = []
    vision = llava._vision
    monkeypatch.setattr(llava, "_vision", lambda *args: calls.append(1) or vision(*args))
    context = llava.encode(random_frame(48, 64))
    llava.answer(context, free(QUESTIONS, 4))
    llava.answer(context, free(QUESTIONS[:1], 4))
    assert len(calls) == 1


@pytest.fixture(scope="module")
def llava_batching(tiny_llava_fp32) -> Engine:
    return Engine.load(tiny_llava_fp32, inference_precision="f32", batch_views=True)


@pytest.mark.parametrize(("arch", "batched"), [("llava_batching", True), ("llava_next", True), ("llava", False)])
def test_views_encoded_together_answer_as_each_encoded_alone(request, arch, batched, monkeypatch):
    """In one batch where the encoder takes one, else tile by tile: the answers are the same."""
    engine = request.getfixturevalue(arch)
    views = [random_frame(48, 64, seed=5), random_frame(100, 37, seed=6), random_frame(240, 320, seed=7)]
    alone = [[a.token_ids for a in engine.answer(engine.encode(view), free(QUESTIONS))] for view in views]
    calls = []
    vision = engine._vision
    monkeypatch.setattr(engine, "_vision", lambda tiles: calls.append(len(tiles)) or vision(tiles))
    contexts = engine.encode_views(views)
    together = [[a.token_ids for a in engine.answer(context, free(QUESTIONS))] for context in contexts]
    assert together == alone
    if batched:
        assert len(calls) == 1 and calls[0] >= len(views)  # LLaVA-NeXT: several tiles per view
    else:
        assert calls == [1] * len(views)


def test_paged_contexts_keep_their_prefixes_side_by_side_until_dropped(llava, monkeypatch):
    """The views of a frame answer in turn without prefilling their prefixes again; a dropped context's
    blocks go back to the pool."""
    language = llava._language
    tokens = []
    run = language.run
    monkeypatch.setattr(
        language, "run", lambda sequences: tokens.append(sum(len(s.embeds) for s in sequences)) or run(sequences)
    )
    one, two = llava.encode_views([random_frame(48, 64, seed=8), random_frame(48, 64, seed=9)])
    first = [a.token_ids for a in llava.answer(one, free(QUESTIONS))]
    first_round_tokens = sum(tokens)
    llava.answer(two, free(QUESTIONS))
    tokens.clear()
    assert [a.token_ids for a in llava.answer(one, free(QUESTIONS))] == first
    assert first_round_tokens - sum(tokens) == one.session.prefix_len  # the prefix was not run again
    per_block = language.pool.bytes_per_block
    assert one.nbytes == one.prefix_embeds.nbytes + len(one.session._held.prefix) * per_block > one.prefix_embeds.nbytes
    prefix_blocks = len(one.session._held.prefix) + len(two.session._held.prefix)
    held = language.pool.capacity - language.pool.free_blocks
    del one, two
    gc.collect()
    assert language.pool.capacity - language.pool.free_blocks <= held - prefix_blocks


def test_the_vision_encoder_runs_static_tiles_one_or_a_batch_of_views_at_a_time(llava, llava_batching, llava_next):
    """The tile's size is fixed; the batch holds one tile, or every tile of the views encoded together (with
    `batch_views`, and on LLaVA-NeXT whose tile count follows the frame)."""
    for engine, batch in ((llava, 1), (llava_batching, -1), (llava_next, -1)):
        side = engine.preprocess(np.zeros((8, 8, 3), np.uint8)).pixel_values.shape[-1]
        assert engine._vision.input(0).get_partial_shape() == ov.PartialShape([batch, 3, side, side])


class StaticOnlyNpu(ov.Core):
    """The one thing mocked: an Intel NPU. Like the NPU's compiler it refuses dynamic shapes; it runs on the CPU
    in f32, so that its results can be compared with the CPU engine's."""

    available_devices = ["CPU", "NPU"]

    def compile_model(self, model, device_name, config=None):
        if device_name == "NPU":
            if model.is_dynamic():
                raise RuntimeError("NPU: dynamic shapes are not supported")
            device_name, config = "CPU", {**(config or {}), "INFERENCE_PRECISION_HINT": "f32"}
        return super().compile_model(model, device_name, config or {})


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_on_the_npu_the_vision_encoder_runs_one_static_tile_at_a_time(request, arch):
    on_cpu = request.getfixturevalue(arch)
    on_npu = Engine(on_cpu.model, StaticOnlyNpu(), DevicePlan(vision="NPU"), inference_precision="f32")
    assert on_npu._vision.input(0).get_partial_shape() == ov.PartialShape([1, 3, *on_cpu.preprocess.tile_shape])
    for size in ((48, 64), (100, 37)):
        frame = random_frame(*size)
        np.testing.assert_allclose(
            on_npu.encode(frame).prefix_embeds, on_cpu.encode(frame).prefix_embeds, rtol=1e-5, atol=1e-5
        )


def test_the_npu_refuses_a_preprocessor_whose_tiles_follow_the_frame(llava, monkeypatch):
    monkeypatch.setattr(ClipPreprocessor, "tile_shape", property(lambda self: None))
    with pytest.raises(UserError, match="cannot run on the NPU: its preprocessor sizes images by the frame"):
        Engine(llava.model, StaticOnlyNpu(), DevicePlan(vision="NPU"), inference_precision="f32")


def test_rows_stop_independently(llava):
    context = llava.encode(random_frame(48, 64))
    limits = [1, 5, 3]
    answers = llava.answer(context, [Prompt(q, n, ignore_eos=True) for q, n in zip(QUESTIONS, limits)])
    assert [len(a.token_ids) for a in answers] == limits
    full = llava.answer(context, free(QUESTIONS, 5, ignore_eos=True))
    assert [a.token_ids for a in answers] == [f.token_ids[:n] for f, n in zip(full, limits)]


def test_an_answer_stops_at_the_end_of_sequence_token(llava):
    """Steer a row into EOS by asking until one answer ends early; it must then be shorter than the limit."""
    eos = llava.model.stop_token_ids[0]
    for seed in range(40):
        context = llava.encode(random_frame(32, 32, seed=seed))
        long = llava.answer(context, free(QUESTIONS, 24, ignore_eos=True))
        for question, answer in zip(QUESTIONS, long):
            if eos in answer.token_ids:
                stopped = llava.answer(context, free([question], 24))[0]
                assert stopped.token_ids == answer.token_ids[: answer.token_ids.index(eos)]
                return
    pytest.skip("no sampled frame made the random model emit its end-of-sequence token")


@pytest.mark.parametrize("prefill", [False, True])
def test_every_answer_reports_its_stage_timings(llava, prefill):
    context = llava.encode(random_frame(48, 64), prefill=prefill)
    answer = llava.answer(context, free(QUESTIONS[:2], 3))[0]
    timings = answer.timings.as_dict()
    assert set(timings) == {"preprocess", "vision", "prefix", "question_prefill", "decode"}
    assert all(value > 0 for stage, value in timings.items() if stage != "prefix")
    assert (timings["prefix"] > 0) == prefill  # otherwise the prefix is prefilled with the questions


def test_a_prefix_prefilled_alone_or_with_the_questions_gives_the_same_answers(llava):
    frame = random_frame(48, 64)
    alone = llava.answer(llava.encode(frame, prefill=True), free(QUESTIONS))
    together = llava.answer(llava.encode(frame), free(QUESTIONS))
    assert [a.token_ids for a in alone] == [a.token_ids for a in together]


def test_int4_and_int8_exports_load_and_answer(tiny_llava_int4, tiny_llava_int8):
    for model in (tiny_llava_int4, tiny_llava_int8):
        engine = Engine.load(model)
        answers = engine.answer(engine.encode(random_frame(48, 64)), free(QUESTIONS, 4))
        assert all(a.token_ids for a in answers)
