"""Option questions are decided from the model's distribution; number questions decode digits only."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine import Engine, Prompt
from edge_agent.engine.constrained import DigitVocabulary, option_probabilities, spellings
from tests.support.reference import random_frame

YES_NO = Prompt("Is the door open? Answer the question using a single word or phrase.", options=("Yes", "No"))
COLOUR = Prompt("What colour is the cup?", options=("red", "dark blue", "green"))


@pytest.fixture(scope="module")
def llava(tiny_llava_fp32) -> Engine:
    return Engine.load(tiny_llava_fp32, inference_precision="f32")


def reference_option_probabilities(reference, frame, prompt: Prompt) -> np.ndarray:
    """transformers, teacher-forced: log P(spelling | prompt) for every spelling, summed per option."""
    import torch

    inputs = reference.inputs(frame, prompt.text)
    prompt_ids = inputs["input_ids"][0].tolist()
    tokenizer = reference.processor.tokenizer
    rendered = reference.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]}],
        add_generation_prompt=True,
    )
    plain_prompt = tokenizer(rendered)["input_ids"]
    per_option = []
    for option in prompt.options:
        scores, seen = [], set()
        for spelling in spellings(option):
            extended = tokenizer(rendered + spelling)["input_ids"]
            if extended[: len(plain_prompt)] != plain_prompt:
                continue
            tail = tuple(extended[len(plain_prompt) :])
            if tail in seen:
                continue
            seen.add(tail)
            ids = torch.tensor([prompt_ids + list(tail)])
            with torch.no_grad():
                logits = reference.model(
                    input_ids=ids,
                    pixel_values=inputs["pixel_values"],
                    attention_mask=torch.ones_like(ids),
                    **({"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}),
                ).logits
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            start = len(prompt_ids)
            scores.append(float(sum(logp[start - 1 + j, token] for j, token in enumerate(tail))))
        per_option.append(scores)
    return option_probabilities(per_option)


@pytest.mark.parametrize("prompt", [YES_NO, COLOUR], ids=["yes_no", "multi_token_choice"])
def test_option_probabilities_equal_transformers_teacher_forced_scores(llava, hf_llava, prompt):
    for seed in range(3):
        frame = random_frame(48, 64, seed=seed)
        answer = llava.answer(llava.encode(frame), [prompt])[0]
        expected = reference_option_probabilities(hf_llava, frame, prompt)
        assert answer.text == prompt.options[int(expected.argmax())]
        assert answer.confidence == pytest.approx(float(expected.max()), abs=1e-4)


def test_multi_token_options_are_scored_over_all_their_tokens(llava):
    assert any(len(ids) > 1 for ids in llava._option_ids(COLOUR.text, "dark blue"))


def test_mixed_batches_answer_each_question_as_it_would_alone(llava):
    context = llava.encode(random_frame(64, 48))
    free = Prompt("Describe the room.", max_new_tokens=6)
    count = Prompt("How many people are there?", max_new_tokens=3, digits=True)
    together = llava.answer(context, [YES_NO, free, COLOUR, count])
    alone = [llava.answer(context, [p])[0] for p in (YES_NO, free, COLOUR, count)]
    assert [(a.text, a.token_ids) for a in together] == [(a.text, a.token_ids) for a in alone]
    assert [a.confidence for a in together] == pytest.approx([a.confidence for a in alone], abs=1e-5)
    assert together[1].confidence is None


def test_digit_questions_only_produce_digits(llava):
    for seed in range(5):
        context = llava.encode(random_frame(40, 40, seed=seed))
        answer = llava.answer(context, [Prompt("How many people are in the room?", max_new_tokens=3, digits=True)])[0]
        assert answer.token_ids and answer.text.strip().isdigit(), answer.text


def test_a_number_opens_with_optional_spaces_then_continues_with_digits_only():
    texts = ["1", " 23", " ", "", "a1", "\u00b2", "<s>", "</s>"]
    vocabulary = DigitVocabulary.from_token_texts(texts)
    assert vocabulary.allowed([], stop=[7]).tolist() == [True, True, True, False, False, False, False, False]
    assert vocabulary.allowed([2], stop=[7]).tolist() == [True, True, True, False, False, False, False, False]
    assert vocabulary.allowed([2, 0], stop=[7]).tolist() == [True, False, False, False, False, False, False, True]


def test_option_probabilities_sum_spellings_and_normalise():
    probabilities = option_probabilities([[np.log(0.2), np.log(0.2)], [np.log(0.1)]])
    assert probabilities == pytest.approx([0.8, 0.2])
