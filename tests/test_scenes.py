"""The synthetic kiosk scenes: deterministic, drawn as their ground truth says, asked about in the agent's
own question forms, and played over time as a video whose truth changes at known moments."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from edge_agent.devtools import scenes
from edge_agent.questions import parse_answer


def scene_from(seed: int, **changes) -> scenes.SyntheticScene:
    return dataclasses.replace(scenes.random_scene(np.random.default_rng(seed)), **changes)


def clean(scene: scenes.SyntheticScene) -> scenes.SyntheticScene:
    """The scene under neutral light without camera noise, so pixel differences come from content only."""
    return dataclasses.replace(scene, brightness=1.0, noise=0.0)


def changed_pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.abs(a.astype(np.int16) - b).sum(axis=2) > 0).astype(np.uint8)


def nearest_colour(bgr: np.ndarray) -> str:
    """The named colour whose direction in BGR space is closest (the lighting scales, it does not tint)."""

    def cosine(name):
        reference = np.array(scenes.COLOURS[name], float)
        return bgr @ reference / (np.linalg.norm(bgr) * np.linalg.norm(reference))

    return max(scenes.COLOURS, key=cosine)


def door_darkness(frame: np.ndarray) -> float:
    """Mean grey level inside the door's area (a closed door is wood brown, an open one a dark corridor)."""
    height, width = frame.shape[:2]
    return float(frame[int(0.3 * height) : int(0.6 * height), int(0.10 * width) : int(0.18 * width)].mean())


def test_the_same_seed_gives_the_same_scene_pixels_and_questions():
    def draw(seed):
        rng = np.random.default_rng(seed)
        scene = scenes.random_scene(rng)
        frame = scenes.render(scene, *scenes.random_size(rng), rng)
        return scene, frame, scenes.questions_for(scene, rng)

    first, again, other = draw(7), draw(7), draw(8)
    assert first[0] == again[0] and np.array_equal(first[1], again[1]) and first[2] == again[2]
    assert first[0] != other[0]


@pytest.mark.parametrize("size", scenes.RESOLUTIONS)
def test_every_resolution_renders_a_bgr_frame_of_that_size(size):
    width, height = size
    frame = scenes.render(scene_from(1), width, height, np.random.default_rng(0))
    assert frame.shape == (height, width, 3) and frame.dtype == np.uint8


@pytest.mark.parametrize("size", [(640, 480), (160, 120), (240, 320)])
def test_as_many_separate_figures_are_drawn_as_the_scene_has_people(size):
    for seed in range(40):
        scene = clean(scene_from(seed, bag_colour=None))
        with_people = scenes.render(scene, *size, None)
        empty_room = scenes.render(dataclasses.replace(scene, people=0), *size, None)
        figures = cv2.connectedComponents(changed_pixels(with_people, empty_room), connectivity=4)[0] - 1
        assert figures == scene.people, f"seed {seed}"


def test_an_open_door_shows_a_dark_doorway_and_a_closed_one_does_not():
    for seed in range(20):
        scene = clean(scene_from(seed))
        opened = scenes.render(dataclasses.replace(scene, door_open=True), 320, 240, None)
        closed = scenes.render(dataclasses.replace(scene, door_open=False), 320, 240, None)
        assert door_darkness(opened) < 30 < door_darkness(closed)


def test_a_bag_is_drawn_on_the_floor_in_its_colour_only_when_present():
    scene = clean(scene_from(3, bag_colour=None))
    no_bag = scenes.render(scene, 320, 240, None)
    with_bag = scenes.render(dataclasses.replace(scene, bag_colour="blue"), 320, 240, None)
    rows, columns = np.nonzero(changed_pixels(with_bag, no_bag))
    assert rows.min() > 0.8 * 240 and columns.min() > 0.6 * 320
    assert nearest_colour(np.median(with_bag[rows, columns], axis=0)) == "blue"


def test_every_taught_answer_parses_to_the_ground_truth():
    rng = np.random.default_rng(0)
    phrasings, types = set(), set()
    for _ in range(300):
        for asked in scenes.questions_for(scenes.random_scene(rng), rng):
            typed = parse_answer(asked.question, asked.answer_text)
            assert typed.value == asked.truth, asked
            if asked.question.type == "choice":
                assert asked.truth in asked.question.options
            phrasings.add(asked.question.question)
            types.add(asked.question.type)
    assert types == {"yes_no", "choice", "number", "text"}
    assert len(phrasings) > 20


def test_questions_follow_the_facts_of_the_scene():
    rng = np.random.default_rng(1)
    without_bag = scene_from(5, bag_colour=None)
    with_bag = scene_from(5, bag_colour="green")
    assert [a.topic for a in scenes.questions_for(without_bag, rng)] == ["door", "people", "cup", "bag"]
    asked = scenes.questions_for(with_bag, rng)
    assert asked[-1].topic == "bag" and asked[-1].truth == "green"


def test_the_timeline_opens_the_door_then_people_come_and_go_at_fixed_times():
    timeline = scenes.scene_timeline(seconds=16.0, seed=2)
    starts = [moment.start for moment in timeline]
    assert starts == [2.0 * index for index in range(8)]
    assert [m.scene.door_open for m in timeline] == [False, True, True, True, True, True, False, False]
    assert [m.scene.people for m in timeline] == [0, 0, 1, 2, 3, 2, 1, 0]
    assert scenes.scene_at(timeline, 1.99).door_open is False
    assert scenes.scene_at(timeline, 2.0).door_open is True
    assert scenes.scene_at(timeline, 8.5).bag_present


def test_the_video_is_readable_by_opencv_and_shows_the_door_open_after_its_moment(tmp_path):
    timeline = scenes.scene_timeline(seconds=8.0, seed=0)  # the door opens at 1 s
    path = scenes.write_video(tmp_path / "demo.mp4", timeline, fps=5, size=(160, 120))
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 40  # the 8 s story at 5 fps
    assert frames[0].shape == (120, 160, 3)
    assert door_darkness(frames[6]) < 40 < door_darkness(frames[4])
