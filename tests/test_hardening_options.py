"""Choice questions with many or long options: bounded in number, characters and tokens, refused in one line
when over, and scored without the memory of the prompt repeated once per option spelling."""

from __future__ import annotations

import random
import time

import pytest

from edge_agent.config import MAX_OPTION_CHARS, MAX_OPTIONS, Question, parse_config
from edge_agent.devtools.bench import rss_mib
from edge_agent.engine import Engine, Prompt
from edge_agent.errors import UserError
from edge_agent.questions import build_prompt
from edge_agent.service import MAX_OPTION_TOKENS, MAX_PROMPT_TOKENS, Agent, prompt_too_long
from tests.support.agent import RunningAgent, agent_config, topic
from tests.support.broker import wait_until
from tests.support.requester import ask_payload
from tests.support.videos import pattern

WORDS = "red green blue door window person chair table open closed small large left right near far".split()
EMOJI = "\U0001f642"


def long_options(count: int = MAX_OPTIONS, chars: int = MAX_OPTION_CHARS) -> tuple[str, ...]:
    """`count` distinct options of `chars` characters made of plain words (about 30 tiny-model tokens each)."""
    rng = random.Random(0)
    return tuple(
        (f"{index} " + " ".join(rng.choice(WORDS) for _ in range(chars // 3)))[:chars] for index in range(count)
    )


def choice(question: str, options: tuple[str, ...]) -> Question:
    return Question(id="q", question=question, type="choice", options=options)


EMOJI_OPTIONS = tuple(f"{index} {EMOJI * 7} door" for index in range(MAX_OPTIONS))
"""Within the character caps, each option within the token cap, but with an emoji question the prompt is
about 800 tokens (tiny model)."""
EMOJI_QUESTION = EMOJI * 30 + " which?"


# -- asks ----------------------------------------------------------------------------------------------

HOSTILE_OPTIONS = {
    "too-many": (long_options(MAX_OPTIONS + 12, 60), f"more than {MAX_OPTIONS}"),
    "too-long": (("yes", "x" * 5000), f"more than {MAX_OPTION_CHARS}"),
    "emoji-option": (("yes", EMOJI * 20), f"tokens long, more than {MAX_OPTION_TOKENS}"),
}


def test_hostile_option_lists_get_an_error_reply_naming_the_limit_and_the_agent_keeps_answering(
    tiny_llava_int8,
    tiny_engine,
    broker,
    make_requester,
    static_video,
):
    asker = make_requester("options")
    with RunningAgent(agent_config(tiny_llava_int8, broker, static_video), engine=tiny_engine) as agent:
        wait_until(lambda: agent.metrics.inferences._value.get() >= 1, timeout=30, what="a first answer")
        for index, (name, (options, _)) in enumerate(HOSTILE_OPTIONS.items()):
            asker.send(
                ask_payload(question="Which one?", type="choice", options=list(options)), name, requester=str(index)
            )
        asker.send(
            ask_payload(question=EMOJI_QUESTION, type="choice", options=list(EMOJI_OPTIONS)),
            "long-prompt",
            requester="prompt",
        )
        asker.send(
            ask_payload(question="What colour is the cup?", type="choice", options=["red", "blue"]),
            "fine",
            requester="fine",
        )
        wait_until(lambda: "fine" in asker.replies, timeout=60, what="the valid question answered")

    replies = asker.replies
    for name, (_, reason) in HOSTILE_OPTIONS.items():
        assert reason in replies[name]["error"], name
    assert f"tokens long, more than {MAX_PROMPT_TOKENS}" in replies["long-prompt"]["error"]
    assert replies["fine"]["value"] in ("red", "blue")


# -- the largest allowed choice ------------------------------------------------------------------------

PEAK_GROWTH_LIMIT_MIB = 48
"""Peak RSS over the warmed-up process while the largest allowed choice is answered three times. Measured
on the tiny model: 15 MiB (the question's blocks, the branches' calls of 8, the plugin's buffers for them).
Before branches were scored after their question, each of its ~40 spellings repeated the 480-token question
in one call: 76 MiB. (The demo model, 32 options of 60 characters: +418 MiB before, +43 MiB after.)"""
KEPT_GROWTH_LIMIT_MIB = 32
"""What may stay resident afterwards: the pool's blocks and the buffers sized for those calls (14 MiB
measured; 76 MiB before, all of the peak kept)."""


def peak_rss_reset() -> None:
    """Make VmHWM (the peak RSS) start again from the current RSS (Linux: `clear_refs` value 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_the_largest_allowed_choice_is_answered_with_bounded_memory_that_returns_near_where_it_was(tiny_llava_int8):
    engine = Engine.load(tiny_llava_int8)  # its own: the shared engine's pool may be sized by earlier tests
    question = choice("Which one of these best describes what the camera shows right now?", long_options())
    assert prompt_too_long(engine, question) is None, "the test's question must be within the limits"
    context = engine.encode(pattern(3))
    small = Prompt(build_prompt(choice("Which colour?", ("red", "blue"))), options=("red", "blue"))
    engine.answer(context, [small, Prompt("Describe it.")])
    largest = Prompt(build_prompt(question), options=question.options)
    before = rss_mib()
    peak_rss_reset()
    answers = [engine.answer(context, [largest])[0] for _ in range(3)]
    peak, after = peak_rss_mib(), rss_mib()

    assert all(answer.text in question.options for answer in answers)
    assert peak - before < PEAK_GROWTH_LIMIT_MIB, f"peak RSS grew by {peak - before:.0f} MiB"
    assert after - before < KEPT_GROWTH_LIMIT_MIB, f"RSS kept {after - before:.0f} MiB"


# -- standing questions --------------------------------------------------------------------------------


def config_with(tiny_llava_int8, broker, static_video, question: dict) -> dict:
    return agent_config(tiny_llava_int8, broker, static_video, questions=[QUESTION_DOOR, question])


QUESTION_DOOR = {"id": "door", "question": "Is the door open?", "type": "yes_no"}


@pytest.mark.parametrize(
    ("options", "key", "reason"),
    [
        (list(long_options(MAX_OPTIONS + 1, 10)), "questions[1].options", f"more than {MAX_OPTIONS}"),
        (["open", "c" * (MAX_OPTION_CHARS + 1)], "questions[1].options[1]", f"more than {MAX_OPTION_CHARS}"),
    ],
)
def test_a_config_with_too_many_or_too_long_options_fails_at_load_with_one_line(tmp_path, options, key, reason):
    config = {
        "model": {"path": str(tmp_path)},
        "questions": [QUESTION_DOOR, {"id": "state", "question": "Which?", "type": "choice", "options": options}],
    }
    with pytest.raises(UserError) as refused:
        parse_config(config)
    message = str(refused.value)
    assert f"{key}: " in message and reason in message and "\n" not in message


@pytest.mark.parametrize(
    ("question", "options", "key", "reason"),
    [
        ("Which?", ["open", f"{EMOJI * 20}"], "questions[1].options[1]", f"more than {MAX_OPTION_TOKENS}"),
        (EMOJI_QUESTION, list(EMOJI_OPTIONS), "questions[1].options", f"more than {MAX_PROMPT_TOKENS}"),
    ],
)
def test_a_config_over_the_token_limits_fails_at_start_before_anything_is_published(
    tiny_llava_int8, tiny_engine, broker, subscriber, static_video, question, options, key, reason
):
    seen = subscriber(broker, "#")
    config = config_with(
        tiny_llava_int8,
        broker,
        static_video,
        {"id": "state", "question": question, "type": "choice", "options": options},
    )
    agent = Agent(parse_config(config), engine=tiny_engine)
    try:
        with pytest.raises(UserError) as refused:
            agent.start()
    finally:
        agent.shutdown()
    message = str(refused.value)
    assert message.startswith(f"{key}: ") and reason in message and "\n" not in message
    time.sleep(0.5)  # anything the agent had published would reach the subscriber by now
    assert not seen.on(topic("availability")) and not seen.messages
