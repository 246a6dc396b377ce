"""States that do not flap: the state the agent publishes for a standing question, given its answers.

A model looking at a borderline scene (a door ajar, a figure half out of frame, a noisy night frame) can
answer differently on two frames of the same scene; published as it comes, every such answer flips the
Home Assistant entity and fires its automations. So each question publishes a confirmed value:

| the latest answer | the published value | the pending change |
| --- | --- | --- |
| from a frame already counted (same or older `frame`) | stays | stays |
| confidence below `min_confidence` (or not a number, when `min_confidence` > 0) | stays | stays |
| the published value | stays | none (the streak of another value is broken) |
| the value of the pending change | becomes it once `confirm` answers agreed | one more agreeing answer |
| another value | stays (or becomes it at once when `confirm` is 1) | that value, one agreeing answer |

An unknown answer (unparseable) is a value like the others: `confirm` unknown answers in a row publish
`unknown`. Until the first value is confirmed the published value is unknown. With `confirm: 1` and
`min_confidence: 0` (the defaults) every answer is published as it comes, as without this module.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from edge_agent.questions import UNKNOWN, Value, kind_of

if TYPE_CHECKING:  # the config imports this module's neighbours only: no import of it at run time
    from edge_agent.config import Question, QuestionDefaults


@dataclasses.dataclass(frozen=True)
class Pending:
    """A change waiting to be confirmed: the value the latest counted answers agree on, and how many did."""

    value: Value | None
    """The candidate typed value (None: the answers were unknown)."""
    agreeing: int
    """Consecutive answers from distinct frames that gave it, so far."""
    needed: int
    """Agreeing answers that publish it (the question's `confirm`)."""


class StableState:
    """The published value and state of one question, changed only by `confirm` agreeing answers."""

    def __init__(self, confirm: int = 1, min_confidence: float = 0.0):
        self.confirm = confirm
        self.min_confidence = min_confidence
        self.value: Value | None = None
        """The published (confirmed) typed value; None while unknown."""
        self.state: str = UNKNOWN
        """The published plain state of `value`."""
        self._candidate: tuple[Value | None, str] | None = None  # the pending value and its state
        self._agreeing = 0
        self._last_frame: int | None = None  # the frame of the last answer that counted

    @classmethod
    def for_question(cls, question: Question, defaults: QuestionDefaults) -> StableState:
        """The rule of `question`: its own `confirm` and `min_confidence`, else `defaults`. Only answers that pick
        an option have a confidence, so no minimum applies to the others."""
        confirm = question.confirm if question.confirm is not None else defaults.confirm
        if not kind_of(question).constraint.picks_option:
            return cls(confirm)
        minimum = question.min_confidence if question.min_confidence is not None else defaults.min_confidence
        return cls(confirm, minimum)

    @property
    def pending(self) -> Pending | None:
        """The change waiting for more agreeing answers, or None."""
        if self._candidate is None:
            return None
        return Pending(value=self._candidate[0], agreeing=self._agreeing, needed=self.confirm)

    def observe(self, value: Value | None, state: str, confidence: float | None, frame: int) -> None:
        """Count the answer `value` (plain state `state`) computed on frame number `frame` (see the table)."""
        if not self._counts(confidence, frame):
            return
        self._last_frame = frame
        if value == self.value:
            self._candidate = None
            return
        if self._candidate is not None and self._candidate[0] == value:
            self._agreeing += 1
        else:
            self._candidate, self._agreeing = (value, state), 1
        if self._agreeing >= self.confirm:
            self.value, self.state = self._candidate
            self._candidate = None

    def _counts(self, confidence: float | None, frame: int) -> bool:
        """Whether an answer is evidence: from a frame not counted yet, and confident enough."""
        if self._last_frame is not None and frame <= self._last_frame:
            return False
        return self.min_confidence == 0 or (confidence is not None and confidence >= self.min_confidence)
