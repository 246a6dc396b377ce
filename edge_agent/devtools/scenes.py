"""Synthetic kiosk-room scenes with ground truth: the images and questions the demo model is trained on.

A scene is a small room seen by a fixed camera: a door on the left that is open or closed, up to three
person-like figures standing in the middle, a counter on the right with a cup on it, and sometimes a bag
on the floor. `render` draws a scene with OpenCV at any resolution (the layout is relative to the frame,
so aspect ratios change proportions, not content), under varying lighting and camera noise.
`questions_for` asks about a scene the way the agent does (`edge_agent.config.Question`, several
phrasings per fact) and gives the typed answer `edge_agent.questions.parse_answer` should return.
`scene_timeline` and `write_video` make a demo video whose ground truth changes at known times.

Only numpy and OpenCV are used, so the demo runs with the runtime install alone. Everything random comes
from the `numpy.random.Generator` passed in: the same seed gives the same scenes, pixels and questions.
"""

from __future__ import annotations

import dataclasses
import pathlib

import cv2
import numpy as np

from edge_agent.config import Question

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (40, 40, 210),
    "green": (50, 170, 50),
    "blue": (200, 80, 30),
    "yellow": (40, 210, 230),
    "white": (240, 240, 240),
}
"""The colours a cup or a bag can have, by name, as BGR."""

MAX_PEOPLE = 3
"""The most person-like figures a scene holds."""

RESOLUTIONS = (
    (160, 120),
    (320, 240),
    (320, 180),
    (400, 400),
    (480, 270),
    (640, 480),
    (640, 360),
    (240, 320),
    (800, 600),
)
"""(width, height) sizes `random_size` picks from: 4:3, 16:9, square and portrait."""

_PERSON_SLOTS = (0.29, 0.43, 0.57)
"""Relative x centres of the people's standing places, between the door and the counter."""


@dataclasses.dataclass(frozen=True)
class SyntheticScene:
    """The ground truth of one frame, and the nuisance parameters that change its look but not the truth."""

    door_open: bool
    """True when the door is open (a dark doorway), False when closed."""
    people: int
    """Number of person-like figures in the room, 0..MAX_PEOPLE."""
    cup_colour: str
    """Colour name (a key of COLOURS) of the cup on the counter."""
    bag_colour: str | None
    """Colour name of the bag on the floor, or None when there is no bag."""
    brightness: float = 1.0
    """Lighting gain applied to the whole image (1.0 = neutral; about 0.55-1.25 in random scenes)."""
    noise: float = 0.0
    """Standard deviation of the camera's Gaussian noise, in 8-bit grey levels."""
    layout_seed: int = 0
    """Seed of the small placement jitter, shirt colours and wall tint: same seed, same arrangement."""

    @property
    def bag_present(self) -> bool:
        return self.bag_colour is not None


def random_scene(rng: np.random.Generator) -> SyntheticScene:
    """A scene with every fact drawn uniformly and random lighting, noise and arrangement."""
    colours = list(COLOURS)
    return SyntheticScene(
        door_open=bool(rng.random() < 0.5),
        people=int(rng.integers(0, MAX_PEOPLE + 1)),
        cup_colour=colours[rng.integers(len(colours))],
        bag_colour=colours[rng.integers(len(colours))] if rng.random() < 0.5 else None,
        brightness=float(rng.uniform(0.55, 1.25)),
        noise=float(rng.uniform(0.0, 10.0)),
        layout_seed=int(rng.integers(2**31)),
    )


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    """A (width, height) from RESOLUTIONS."""
    return RESOLUTIONS[rng.integers(len(RESOLUTIONS))]


# -- drawing --------------------------------------------------------------------------------------------


def render(scene: SyntheticScene, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """The scene as a BGR uint8 image of `height` x `width`; `rng` draws the camera noise only."""
    layout = np.random.default_rng(scene.layout_seed)
    canvas = _Canvas(width, height)
    _draw_room(canvas, layout)
    _draw_door(canvas, scene.door_open, layout)
    _draw_counter_and_cup(canvas, scene.cup_colour, layout)
    _draw_people(canvas, scene.people, layout)
    if scene.bag_colour is not None:
        _draw_bag(canvas, scene.bag_colour, layout)
    return _camera(canvas.image, scene.brightness, scene.noise, rng)


class _Canvas:
    """A BGR image drawn on in relative coordinates (0..1 across and down), so every size shows the same room."""

    def __init__(self, width: int, height: int):
        self.image = np.zeros((height, width, 3), np.uint8)
        self.width, self.height = width, height

    def point(self, x: float, y: float) -> tuple[int, int]:
        return round(x * self.width), round(y * self.height)

    def rect(self, x0: float, y0: float, x1: float, y1: float, colour) -> None:
        cv2.rectangle(self.image, self.point(x0, y0), self.point(x1, y1), _bgr(colour), cv2.FILLED)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, colour) -> None:
        axes = (max(1, round(rx * self.width)), max(1, round(ry * self.height)))
        cv2.ellipse(self.image, self.point(cx, cy), axes, 0, 0, 360, _bgr(colour), cv2.FILLED, cv2.LINE_AA)

    def polygon(self, points: list[tuple[float, float]], colour) -> None:
        pixels = np.array([self.point(x, y) for x, y in points], np.int32)
        cv2.fillPoly(self.image, [pixels], _bgr(colour), cv2.LINE_AA)


def _bgr(colour) -> tuple[int, int, int]:
    return tuple(int(np.clip(c, 0, 255)) for c in colour)


_FLOOR_Y = 0.72
"""Where the back wall meets the floor, as a fraction of the height."""


def _draw_room(canvas: _Canvas, layout: np.random.Generator) -> None:
    wall = np.array((175, 190, 200)) + layout.integers(-20, 21, 3)
    floor = np.array((85, 95, 110)) + layout.integers(-15, 16, 3)
    canvas.rect(0, 0, 1, _FLOOR_Y, wall)
    canvas.rect(0, _FLOOR_Y, 1, 1, floor)
    canvas.rect(0.40, 0.10, 0.62, 0.30, wall - 35)  # a picture on the wall, never mistaken for a door
    canvas.rect(0.42, 0.12, 0.60, 0.28, wall + 25)


def _draw_door(canvas: _Canvas, door_open: bool, layout: np.random.Generator) -> None:
    left = 0.06 + layout.uniform(-0.02, 0.02)
    right, top = left + 0.16, 0.16
    wood = np.array((40, 75, 120)) + layout.integers(-10, 11, 3)
    canvas.rect(left - 0.015, top - 0.02, right + 0.015, _FLOOR_Y, (230, 230, 225))  # frame
    if door_open:
        canvas.rect(left, top, right, _FLOOR_Y, (25, 22, 20))  # the dark corridor behind
        canvas.polygon(
            [(right, top), (right + 0.06, top - 0.05), (right + 0.06, _FLOOR_Y + 0.08), (right, _FLOOR_Y)], wood
        )  # the leaf swung into the room
    else:
        canvas.rect(left, top, right, _FLOOR_Y, wood)
        canvas.ellipse(right - 0.025, 0.46, 0.008, 0.012, (60, 200, 220))  # the handle


def _draw_counter_and_cup(canvas: _Canvas, cup_colour: str, layout: np.random.Generator) -> None:
    top = 0.50 + layout.uniform(-0.02, 0.02)
    counter = np.array((120, 120, 125)) + layout.integers(-15, 16, 3)
    canvas.rect(0.68, top, 0.97, 0.84, counter)
    canvas.rect(0.66, top - 0.03, 0.99, top, counter + 40)
    cx = layout.uniform(0.74, 0.88)
    colour = COLOURS[cup_colour]
    canvas.rect(cx - 0.035, top - 0.17, cx + 0.035, top - 0.03, colour)  # 4-5 px by 9 at the model's 64 px
    canvas.ellipse(cx + 0.045, top - 0.10, 0.015, 0.035, colour)  # the handle


def _draw_people(canvas: _Canvas, count: int, layout: np.random.Generator) -> None:
    slots = sorted(layout.choice(len(_PERSON_SLOTS), size=count, replace=False))
    for slot in slots:
        cx = _PERSON_SLOTS[slot] + layout.uniform(-0.01, 0.01)  # figures never touch
        feet = layout.uniform(0.86, 0.94)
        tall = layout.uniform(0.50, 0.62)
        shirt = layout.integers(30, 226, 3)
        trousers = layout.integers(20, 90, 3)
        skin = np.array((150, 175, 215)) * layout.uniform(0.5, 1.05)
        head_r = tall * 0.09
        shoulders = feet - tall + 2 * head_r
        canvas.rect(cx - 0.035, shoulders + 0.42 * tall, cx - 0.004, feet, trousers)  # legs
        canvas.rect(cx + 0.004, shoulders + 0.42 * tall, cx + 0.035, feet, trousers)
        canvas.polygon(
            [
                (cx - 0.045, shoulders),
                (cx + 0.045, shoulders),
                (cx + 0.04, shoulders + 0.44 * tall),
                (cx - 0.04, shoulders + 0.44 * tall),
            ],
            shirt,
        )  # torso
        canvas.ellipse(cx, feet - tall + head_r, head_r * 0.75, head_r, skin)


def _draw_bag(canvas: _Canvas, bag_colour: str, layout: np.random.Generator) -> None:
    cx = layout.uniform(0.70, 0.90)
    bottom = layout.uniform(0.92, 0.97)
    colour = np.array(COLOURS[bag_colour])
    canvas.ellipse(cx, bottom - 0.09, 0.03, 0.04, colour * 0.7)  # the strap
    canvas.ellipse(cx, bottom - 0.09, 0.018, 0.025, (85, 95, 110))
    canvas.rect(cx - 0.055, bottom - 0.08, cx + 0.055, bottom, colour)


def _camera(image: np.ndarray, brightness: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Lighting gain and a lighting gradient from the left, then Gaussian sensor noise."""
    height, width = image.shape[:2]
    gradient = np.linspace(1.0, 0.85, width, dtype=np.float32)[None, :, None]
    lit = image.astype(np.float32) * (brightness * gradient)
    if noise > 0:
        lit += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
    return np.clip(lit, 0, 255).astype(np.uint8)


# -- questions ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Asked:
    """A question about a scene and the typed value `parse_answer` should give for a right answer."""

    question: Question
    truth: bool | int | str
    topic: str
    """What the question is about: door, people, cup or bag (reports group accuracy by it)."""

    @property
    def answer_text(self) -> str:
        """How the model is taught to answer: Yes/No, a digit, the option verbatim, or a colour word."""
        if isinstance(self.truth, bool):
            return "Yes" if self.truth else "No"
        return str(self.truth)


DOOR_OPEN_QUESTIONS = ("Is the door open?", "Is the door opened?", "Is the door standing open?", "Is the door ajar?")
DOOR_CLOSED_QUESTIONS = ("Is the door closed?", "Is the door shut?")
_DOOR_STATE = ("Is the door open or closed?", "What is the state of the door?", "The door is:")
_PEOPLE_COUNT = (
    "How many people are in the room?",
    "How many people are there?",
    "How many persons can you see?",
    "How many people are visible?",
    "Count the people.",
)
_PEOPLE_ANY = (
    "Is there anyone in the room?",
    "Is anybody there?",
    "Are there people in the room?",
    "Is someone in the room?",
)
_ROOM_EMPTY = ("Is the room empty?", "Is the room empty of people?")
_CUP_COLOUR = (
    "What colour is the cup?",
    "What color is the cup?",
    "What colour is the cup on the counter?",
    "Which colour does the cup have?",
)
_BAG_ANY = (
    "Is there a bag on the floor?",
    "Did someone leave a bag?",
    "Is a bag lying on the floor?",
    "Is there a bag?",
)
_BAG_COLOUR = ("What colour is the bag?", "What color is the bag on the floor?")


def questions_for(scene: SyntheticScene, rng: np.random.Generator) -> list[Asked]:
    """One question per fact of the scene, each type and phrasing drawn at random."""
    asked = [
        _door_question(scene, rng),
        _people_question(scene, rng),
        _colour_question("cup", scene.cup_colour, _CUP_COLOUR, rng),
        _bag_question(scene, rng),
    ]
    if scene.bag_colour is not None:
        asked.append(_colour_question("bag", scene.bag_colour, _BAG_COLOUR, rng))
    return asked


def _pick(rng: np.random.Generator, phrasings: tuple[str, ...]) -> str:
    return phrasings[rng.integers(len(phrasings))]


def _yes_no(topic: str, text: str, truth: bool) -> Asked:
    return Asked(Question(id=topic, question=text, type="yes_no"), truth, topic)


def _choice(topic: str, text: str, options: list[str], truth: str) -> Asked:
    return Asked(Question(id=topic, question=text, type="choice", options=tuple(options)), truth, topic)


def _door_question(scene: SyntheticScene, rng: np.random.Generator) -> Asked:
    kind = rng.integers(3)
    if kind == 0:
        return _yes_no("door", _pick(rng, DOOR_OPEN_QUESTIONS), scene.door_open)
    if kind == 1:
        return _yes_no("door", _pick(rng, DOOR_CLOSED_QUESTIONS), not scene.door_open)
    options = ["open", "closed"] if rng.random() < 0.5 else ["closed", "open"]
    return _choice("door", _pick(rng, _DOOR_STATE), options, "open" if scene.door_open else "closed")


def _people_question(scene: SyntheticScene, rng: np.random.Generator) -> Asked:
    kind = rng.integers(4)
    if kind <= 1:
        return Asked(Question(id="people", question=_pick(rng, _PEOPLE_COUNT), type="number"), scene.people, "people")
    if kind == 2:
        return _yes_no("people", _pick(rng, _PEOPLE_ANY), scene.people > 0)
    return _yes_no("people", _pick(rng, _ROOM_EMPTY), scene.people == 0)


def _colour_question(topic: str, colour: str, phrasings: tuple[str, ...], rng: np.random.Generator) -> Asked:
    text = _pick(rng, phrasings)
    if rng.random() < 0.5:
        return Asked(Question(id=topic, question=text, type="text"), colour, topic)
    others = [name for name in COLOURS if name != colour]
    options = [colour, *rng.choice(others, size=int(rng.integers(1, len(others) + 1)), replace=False)]
    rng.shuffle(options)
    return _choice(topic, text, [str(option) for option in options], colour)


def _bag_question(scene: SyntheticScene, rng: np.random.Generator) -> Asked:
    return _yes_no("bag", _pick(rng, _BAG_ANY), scene.bag_present)


# -- a scene over time ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Moment:
    """The scene shown from `start` seconds until the next moment's start."""

    start: float
    scene: SyntheticScene


def scene_timeline(seconds: float = 30.0, seed: int = 0) -> list[Moment]:
    """A demo story: an empty room with the door closed, the door opens, people come in one by one, a bag
    is left behind, people leave, the door closes. Changes happen at fixed fractions of `seconds`, so the
    ground truth at any time is known exactly; lighting and arrangement stay fixed through the story."""
    rng = np.random.default_rng(seed)
    base = SyntheticScene(
        door_open=False,
        people=0,
        cup_colour=list(COLOURS)[rng.integers(len(COLOURS))],
        bag_colour=None,
        brightness=float(rng.uniform(0.85, 1.1)),
        noise=3.0,
        layout_seed=int(rng.integers(2**31)),
    )
    story = [
        {},
        {"door_open": True},
        {"people": 1},
        {"people": 2},
        {"people": 3, "bag_colour": "red"},
        {"people": 2},
        {"people": 1, "door_open": False},
        {"people": 0},
    ]
    moments, scene = [], base
    for index, change in enumerate(story):
        scene = dataclasses.replace(scene, **change)
        moments.append(Moment(start=round(seconds * index / len(story), 3), scene=scene))
    return moments


def scene_at(timeline: list[Moment], t: float) -> SyntheticScene:
    """The scene shown at `t` seconds."""
    current = timeline[0].scene
    for moment in timeline:
        if moment.start <= t:
            current = moment.scene
    return current


def write_video(
    path,
    timeline: list[Moment],
    fps: float,
    size: tuple[int, int],
    seconds: float | None = None,
    seed: int = 0,
    beside: tuple[list[Moment], ...] = (),
) -> pathlib.Path:
    """Write the timeline as an MPEG-4 (mp4v) file of `size` (width, height) at `fps`; returns the path.

    The video lasts `seconds`, by default until one interval after the last change. Each frame gets fresh
    camera noise, as a real camera would, drawn from `seed`. With `beside`, the video shows several rooms in a
    row, each `size` and following its own timeline (`render_grid`): room 0 is `timeline`.
    """
    if seconds is None:
        seconds = timeline[-1].start + (timeline[-1].start - timeline[0].start) / max(1, len(timeline) - 1)
    timelines = (timeline, *beside)
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width * len(timelines), height))
    if not writer.isOpened():
        raise OSError(f"cv2.VideoWriter cannot write {path}")
    rng = np.random.default_rng(seed)
    try:
        for index in range(round(seconds * fps)):
            rooms = [scene_at(room, index / fps) for room in timelines]
            writer.write(render_grid(rooms, len(rooms), width, height, rng))
    finally:
        writer.release()
    return pathlib.Path(path)


def render_grid(rooms: list[SyntheticScene], columns: int, width: int, height: int, rng) -> np.ndarray:
    """The rooms in a grid of `columns` columns (left to right, then top to bottom), each `width` x `height`: what
    one wide camera over several rooms, or a camera on a multiview monitor, shows. Room i is `grid_region(i, ...)`
    of it; on the whole frame each room gets only its share of the model's input pixels."""
    rows = -(-len(rooms) // columns)
    frame = np.zeros((rows * height, columns * width, 3), np.uint8)
    for index, room in enumerate(rooms):
        row, column = divmod(index, columns)
        frame[row * height : (row + 1) * height, column * width : (column + 1) * width] = render(
            room, width, height, rng
        )
    return frame


def grid_region(index: int, columns: int, rows: int = 1) -> tuple[float, float, float, float]:
    """The region (`config.Region`) of room `index` of a `render_grid` frame of `columns` x `rows` rooms."""
    row, column = divmod(index, columns)
    return (column / columns, row / rows, (column + 1) / columns, (row + 1) / rows)
