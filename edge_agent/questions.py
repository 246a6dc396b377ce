"""Standing questions: the table of question kinds (each kind's prompt instruction, typed parsing of the
model's raw answer, Home Assistant state, engine constraint and entity), and which questions are due on a
frame.

A question kind lives in one row of `KINDS`: the config's `type` check, the prompt, the parser, the state,
the engine's constrained decoding and Home Assistant discovery all read that row, so a new kind is one row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from edge_agent import device_classes

if TYPE_CHECKING:  # the config imports this table to check `type`, so the config is not imported at run time
    from edge_agent.config import Question

Value = bool | int | str
"""A typed answer."""

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's short-answer instruction, appended verbatim to the VQAv2, GQA and OCR-VQA questions of its
instruction data (llava_v1_5_mix665k) and used by its yes/no (POPE) and VQA evaluations: the model was
tuned to answer "Yes", "2" or "Red" after it, which is what the parsers below expect."""

ONE_OF_THE_OPTIONS = "Answer with one of the options."
"""LLaVA-1.5's multiple-choice data letters the options and asks "Answer with the option's letter from
the given choices directly.". A letter would have to be mapped back, and a wrong letter is a confident
wrong answer; the option text itself can be checked against the list, so options are listed verbatim
(one per line, in the same layout) and the answer is asked for as one of them."""

MAX_STATE_CHARS = 255
"""Home Assistant rejects sensor states longer than this."""

ON, OFF = "ON", "OFF"
"""The state of a yes/no answer, and the payloads its binary sensor is told to read."""
UNKNOWN = "unknown"
"""The state of an answer that could not be typed (and of a question with no confirmed value yet)."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What the engine must do to answer a kind: pick one option, decode digits only, or decode freely."""

    options: tuple[str, ...] = ()
    """Fixed options the answer is picked among (the most probable one; no free decoding)."""
    question_options: bool = False
    """The answer is picked among the question's own `options`, which such a question must list."""
    digits: bool = False
    """Free decoding may only emit digits."""

    @property
    def picks_option(self) -> bool:
        """The answer is one of a list of options, picked with a probability: the answer's confidence."""
        return bool(self.options) or self.question_options

    def options_for(self, question: Question) -> tuple[str, ...]:
        """The options the engine picks among for `question`; none means it decodes."""
        return tuple(question.options) if self.question_options else self.options


@dataclasses.dataclass(frozen=True)
class Component:
    """How Home Assistant shows a kind: the MQTT discovery component and the fields its config needs."""

    name: str
    """`binary_sensor` (the state is ON or OFF) or `sensor`."""
    fields: Mapping[str, object] = dataclasses.field(default_factory=dict)
    """Fixed fields of the discovery config (`payload_on`, `state_class`, ...)."""
    enum: bool = False
    """The entity is an `enum` sensor whose `options` are the question's options."""
    unknown_as_none: bool = False
    """Map the state `unknown` to `None` in the entity's value template. Binary and numeric entities read
    `None` as "unknown"; Home Assistant shows it as the text "None" on others, which read the plain
    `unknown` as unknown already."""
    device_classes: frozenset[str] = frozenset()
    """The Home Assistant device classes a question of this kind may set: those of the component that fit
    what the entity shows (none for an `enum` sensor, which is always `enum`, or for free text)."""


@dataclasses.dataclass(frozen=True)
class QuestionKind:
    """One answer type a question may have (its config `type`), and everything that depends on it."""

    name: str
    """The `type` that names the kind in config.yaml and in an ask request."""
    instruction: str
    """The answer-format instruction appended after the question (and a choice's options)."""
    parse: Callable[[str, tuple[str, ...]], Value | None]
    """(raw answer, the question's options) -> the typed value, or None when the answer is unknown."""
    state: Callable[[Value], str]
    """A typed value -> its plain Home Assistant state (`state_string` caps it at `MAX_STATE_CHARS`)."""
    constraint: Constraint
    """What the engine must do to answer."""
    component: Component
    """How Home Assistant shows the answers."""


_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
        " sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"none": 0, "no": 0}
"""Number words a counting answer may use; "no"/"none" answer "how many ..." with zero."""

_YES_NO = {"yes": True, "y": True, "true": True, "no": False, "n": False, "false": False}


def _words(text: str) -> list[str]:
    """Lower-case words and numbers, punctuation dropped ("Yes, 2.5!" -> ["yes", "2.5"])."""
    return re.findall(r"[0-9]+(?:[.,][0-9]+)*|[^\W\d_]+", text.casefold())


def _yes_no(text: str, options: tuple[str, ...]) -> bool | None:
    """The first word decides: "Yes, the door is open." -> True."""
    words = _words(text)
    return _YES_NO.get(words[0]) if words else None


def _choice(text: str, options: tuple[str, ...]) -> str | None:
    """The one option the answer names as whole words, else the one option the answer begins.

    Words are compared case-insensitively without punctuation. An option inside a longer named option
    ("open" in "half open") does not count; more than one candidate means unknown.
    """
    answer = " ".join(_words(text))
    spelled = {option: " ".join(_words(option)) for option in options}
    named = [option for option, words in spelled.items() if _contains_words(answer, words)]
    named = [
        option
        for option in named
        if not any(other != option and _contains_words(spelled[other], spelled[option]) for other in named)
    ]
    begun = [option for option, words in spelled.items() if answer and words.startswith(answer)]
    candidates = named or begun
    return candidates[0] if len(candidates) == 1 else None


def _contains_words(text: str, words: str) -> bool:
    return f" {words} " in f" {text} "


def _number(text: str, options: tuple[str, ...]) -> int | None:
    """The count the answer states in digits or words; none, several different or a fraction -> unknown."""
    values = set()
    for word in _words(text):
        if word[0].isdigit():
            if not word.isdigit():
                return None
            values.add(int(word))
        elif word in _NUMBER_WORDS:
            values.add(_NUMBER_WORDS[word])
    return values.pop() if len(values) == 1 else None


def _text(text: str, options: tuple[str, ...]) -> str | None:
    return text.strip() or None


def _on_off(value: Value) -> str:
    return ON if value else OFF


KINDS: dict[str, QuestionKind] = {
    kind.name: kind
    for kind in (
        QuestionKind(
            "yes_no",
            SHORT_ANSWER,
            _yes_no,
            _on_off,
            Constraint(options=("Yes", "No")),
            Component(
                "binary_sensor",
                {"payload_on": ON, "payload_off": OFF},
                unknown_as_none=True,
                device_classes=device_classes.BINARY_SENSOR,
            ),
        ),
        QuestionKind(
            "choice",
            ONE_OF_THE_OPTIONS,
            _choice,
            str,
            Constraint(question_options=True),
            Component("sensor", enum=True),
        ),
        QuestionKind(
            "number",
            SHORT_ANSWER,
            _number,
            str,
            Constraint(digits=True),
            Component(
                "sensor",
                {"state_class": "measurement"},
                unknown_as_none=True,
                device_classes=device_classes.SENSOR_MEASURED_WITHOUT_UNIT,
            ),
        ),
        QuestionKind("text", SHORT_ANSWER, _text, str, Constraint(), Component("sensor")),
    )
}
"""The question kinds by name, in the order error messages list them."""


def kind_of(question: Question) -> QuestionKind:
    """The row of the question's `type` (the config checked that it has one)."""
    return KINDS[question.type]


@dataclasses.dataclass(frozen=True)
class TypedAnswer:
    """The model's answer to one question: the typed `value` (None when unparseable) and the raw text."""

    value: Value | None
    raw: str

    @property
    def ok(self) -> bool:
        """True when the raw text gave a value; an unparseable answer is reported as unknown, never guessed."""
        return self.value is not None


def build_prompt(question: Question) -> str:
    """The user text sent with the image: the question, the options of a choice, then the instruction.

    The question's own `instruction` replaces the kind's; an empty one leaves the instruction out.
    """
    instruction = kind_of(question).instruction if question.instruction is None else question.instruction
    lines = [question.question.strip(), *question.options, instruction]
    return "\n".join(line for line in lines if line)


def parse_answer(question: Question, raw_text: str) -> TypedAnswer:
    """Turn the model's raw text into the question's type; anything ambiguous stays unknown."""
    return TypedAnswer(kind_of(question).parse(raw_text, question.options), raw_text)


def state_string(question: Question, typed: TypedAnswer) -> str:
    """The plain state for Home Assistant: ON/OFF, the option, the integer or the (capped) text."""
    if not typed.ok:
        return UNKNOWN
    return kind_of(question).state(typed.value)[:MAX_STATE_CHARS]


class Schedule:
    """Which standing questions are due on a frame.

    A question never answered is due at once, so the first frame answers everything. After that an
    `interval` question is due `every` seconds after its last answer; a `change` question is due when
    the scene changed since its last answer and at least `every` seconds have passed, so a burst of
    changes yields one answer per `every` and the last change of a burst is still answered.
    """

    def __init__(self, questions: Iterable[Question]):
        self._questions = tuple(questions)
        self._answered_at: dict[str, float] = {}
        self._changed_since_answer: set[str] = set()
        self._disabled: set[str] = set()

    def due(self, now: float, scene_changed: bool) -> list[Question]:
        """The enabled questions to answer on the frame seen at `now` (seconds, monotonic clock).

        Records `scene_changed` for the change-triggered questions that are not yet due.
        """
        if scene_changed:
            self._changed_since_answer.update(question.id for question in self._questions)
        return [question for question in self.enabled if self._is_due(question, now)]

    @property
    def questions(self) -> tuple[Question, ...]:
        """Every question scheduled, in config order."""
        return self._questions

    @property
    def enabled(self) -> list[Question]:
        """The questions not disabled, in config order."""
        return [question for question in self._questions if question.id not in self._disabled]

    def set_enabled(self, question_id: str, enabled: bool) -> None:
        """Enable or disable a question: a disabled one is never due; an enabled one again is due at once."""
        if not enabled:
            self._disabled.add(question_id)
        elif question_id in self._disabled:
            self._disabled.discard(question_id)
            self._answered_at.pop(question_id, None)

    def mark_answered(self, question_id: str, now: float) -> None:
        """Record that the question was answered on the frame seen at `now`."""
        self._answered_at[question_id] = now
        self._changed_since_answer.discard(question_id)

    def _is_due(self, question: Question, now: float) -> bool:
        answered_at = self._answered_at.get(question.id)
        if answered_at is None:
            return True
        waited = now - answered_at >= question.every
        if question.trigger == "interval":
            return waited
        return waited and question.id in self._changed_since_answer
