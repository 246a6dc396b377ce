"""What the agent knows of each view of the camera: its questions, its scene gate and its encoded scene.

A view is a region of the frame (`capture.views`; None: the whole frame) and the standing questions that
name it. Each view is gated on its own crop, so a change outside a region neither encodes that region
again nor asks its questions again; a change inside does. Each encoded view is a `Scene`: the context the
engine answers on and the answers it already gave.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edge_agent.capture import SceneGate
from edge_agent.capture.reader import Frame
from edge_agent.capture.views import crop
from edge_agent.config import Question, Region, SceneGateSettings
from edge_agent.engine import FrameContext
from edge_agent.mqtt import AnswerMessage
from edge_agent.questions import Schedule


@dataclasses.dataclass
class Scene:
    """The frame context answers are computed on, and the answers it already gave."""

    context: FrameContext | None  # None once dropped for the context budget (`View.drop_context`)
    frame_ts: float  # newest frame known to show this scene (in this view)
    seq: int  # the number of the frame encoded
    image: np.ndarray  # the view encoded (the crop of the frame): every answer on this context was given on it
    answers: dict[str, AnswerMessage] = dataclasses.field(default_factory=dict)


class View:
    """One region of the camera's frames, the questions that look at it, and its encoded scene."""

    def __init__(self, region: Region | None, questions: list[Question], gate: SceneGateSettings) -> None:
        self.region = region
        self.schedule = Schedule(questions)
        self._gate = SceneGate(gate)
        self.scene: Scene | None = None
        self.unencoded: Frame | None = None  # the newest frame, while the gate finds this view changed in it

    def look(self, frame: Frame, now: float) -> list[Question]:
        """Gate this view of the new frame against its encoded scene; return its standing questions due on it.

        A scene whose context was dropped (`drop_context`) is no change: its questions are not due for it, but
        the newest frame is `unencoded`, to be encoded when something must be answered on the view."""
        changed = self.scene is None or self._gate.changed(self.cut(frame), frame.ts)
        if changed or self.scene.context is None:
            self.unencoded = frame
        else:  # the newest frame shows the encoded scene (a changed frame seen before it no longer counts)
            self.unencoded = None
        if not changed:
            self.scene.frame_ts = frame.ts
        return self.schedule.due(now, changed)

    @property
    def has_context(self) -> bool:
        """Whether the view's scene is encoded and its context kept."""
        return self.scene is not None and self.scene.context is not None

    def drop_context(self) -> None:
        """Let the engine's memory of this view go (the context budget): the scene and its answers stay known,
        and the view is encoded again when something must be answered on it."""
        self.scene.context = None

    def cut(self, frame: Frame) -> np.ndarray:
        """This view of `frame`."""
        return crop(frame.image, self.region)

    def encoded(self, frame: Frame, context: FrameContext) -> None:
        """`context` is this view of `frame`, encoded: the view's new scene and its gate's reference."""
        image = self.cut(frame)
        self._gate.accept(image, frame.ts)
        self.scene = Scene(context=context, frame_ts=frame.ts, seq=frame.seq, image=image)
        self.unencoded = None


def views_of(questions: tuple[Question, ...], gate: SceneGateSettings) -> dict[Region | None, View]:
    """One view per region the questions name, in the order they first name it, and the whole frame's (which
    answers asks without a region even when no standing question looks at the whole frame)."""
    regions = dict.fromkeys([None, *(question.region for question in questions)])
    return {region: View(region, [q for q in questions if q.region == region], gate) for region in regions}
