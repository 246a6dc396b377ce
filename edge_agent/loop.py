"""What one turn of the agent loop does: the decision alone, apart from its effects (`Agent.step` acts on it).

Encoding a frame is the expensive step (about a second on the 7B model), so a frame is encoded only when
something must be answered on it; and an answer is always computed on the scene the camera shows now. A
question whose change waits for confirmation (`edge_agent.stable`) is re-checked on every new frame, and
the frame is encoded even when the gate finds it unchanged: the same context would only repeat its answer.

| the newest frame changed | a context exists | a question is due or an ask pending | a re-check on a new frame | turn |
| --- | --- | --- | --- | --- |
| any | any | no | no | `SKIP` |
| any | any | any | yes | `ENCODE` |
| yes | any | yes | no | `ENCODE` |
| no | yes | yes | no | `REUSE` (`ENCODE` when a check-now `forced` it) |
| no | no | yes | no | `NO_FRAME` |

A check-now (Home Assistant's button) makes its questions due and forces an encode of the newest frame even
when the gate finds it unchanged: the person who pressed wants an answer about the scene as it is now.
"""

from __future__ import annotations

import enum


class Turn(enum.Enum):
    """What the loop does with the newest frame and the questions waiting for an answer."""

    ENCODE = "encode"
    """Encode the newest frame (the gate found it changed, or a pending change is re-checked on it), then
    answer what is due, pending and re-checked on it."""
    REUSE = "reuse"
    """Answer on the frame context already encoded (the newest frame shows its scene); due standing
    questions that it already answered republish those answers."""
    SKIP = "skip"
    """Nothing is due or pending: encode nothing, answer nothing (a changed frame waits until needed)."""
    NO_FRAME = "no_frame"
    """Questions wait but no frame was ever seen: pending asks are refused."""


def decide(
    changed: bool, have_context: bool, due: int, pending_asks: int, rechecks: int = 0, forced: bool = False
) -> Turn:
    """The turn for the newest frame.

    `changed`: the gate found the newest frame different from the encoded one (or nothing is encoded yet
    and a frame exists); `have_context`: a frame was encoded; `due`: standing questions due on the newest
    frame (those a check-now asks for included); `pending_asks`: ad hoc questions waiting; `rechecks`:
    questions with a pending change to answer again on the newest frame, which is new (none when no new frame
    came); `forced`: a check-now asks for the newest frame to be encoded whatever the gate says.
    """
    if not due and not pending_asks and not rechecks:
        return Turn.SKIP
    if changed or rechecks or (forced and have_context):
        return Turn.ENCODE
    return Turn.REUSE if have_context else Turn.NO_FRAME
