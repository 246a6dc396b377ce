"""What the page may do, checked as the MQTT side checks it: ask (an `AskRequest`), flip a switch and press
"check now" (a `Command`), and turn a drawn rectangle into a `region:` line.

An ask from the page carries a `PageReply` as its reply address: the service answers it like any ask, and
its `reply` and `publish_ask_evidence` calls (the two an `AgentLink` offers) hand the answer and the image
back to the HTTP request waiting for them instead of publishing them.
"""

from __future__ import annotations

import dataclasses
import threading

from edge_agent.capture.views import region_text
from edge_agent.mqtt.ask import AskRefusal, AskReply, AskRequest, BadRequest, ReplyAddress, region_field
from edge_agent.mqtt.commands import CHECK, ENABLED, Command

PAGE_EVIDENCE = "page"
"""The `evidence_topic` of a page's answer: its image goes back with the answer, not to a topic."""
REGION_DECIMALS = 3
"""Decimals of the fractions in a `region:` line: a thousandth of a 1920-pixel frame is 2 pixels."""


class _Answer:
    """Where the service leaves the answer to one page ask, and the event its HTTP request waits on."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.message: AskReply | AskRefusal | None = None
        self.jpeg: bytes | None = None


@dataclasses.dataclass(frozen=True)
class PageReply(ReplyAddress):
    """The reply address of an ask from the status page; a reply channel like `AgentLink` (`reply`,
    `publish_ask_evidence`)."""

    topic: str = "page"
    answer: _Answer = dataclasses.field(default_factory=_Answer, compare=False, repr=False)

    def publish_ask_evidence(self, request: AskRequest, jpeg: bytes) -> str:
        self.answer.jpeg = jpeg
        return PAGE_EVIDENCE

    def reply(self, request: AskRequest, message: AskReply | AskRefusal) -> None:
        self.answer.message = message
        self.answer.ready.set()

    def wait(self, timeout_s: float) -> bool:
        return self.answer.ready.wait(timeout_s)


def command_from(fields: dict, question_ids: frozenset[str], kind: str) -> Command:
    """The switch flip (`{"question_id": ..., "enabled": true}`) or press (`{"question_id": ...}`, null for
    every question) a request body asks for; `BadRequest` for anything else."""
    question_id = fields.get("question_id")
    if kind == CHECK and question_id is None:
        return Command(CHECK, None)
    if not isinstance(question_id, str) or question_id not in question_ids:
        raise BadRequest("'question_id' must name a configured question")
    if kind == CHECK:
        return Command(CHECK, question_id)
    enabled = fields.get("enabled")
    if not isinstance(enabled, bool):
        raise BadRequest("'enabled' must be true or false")
    return Command(ENABLED, question_id, enabled)


def region_line(fields: dict) -> dict:
    """The `region:` line to paste into config.yaml for the body's `region`, rounded to `REGION_DECIMALS`
    and checked as config.yaml's is (`config.region_problem`) after rounding."""
    region = region_field(fields)
    if region is None:
        raise BadRequest("'region' must be a list of 4 numbers [x0, y0, x1, y1]")
    rounded = region_field({"region": [round(edge, REGION_DECIMALS) for edge in region]})
    return {"region": list(rounded), "line": f"region: {region_text(rounded)}"}
