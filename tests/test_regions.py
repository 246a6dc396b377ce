"""A region per question (`region: [x0, y0, x1, y1]`, fractions of the frame): the model answers on the crop.

Questions with the same region share one view: one crop, one encode, one context. Each view is gated on its
own crop, so a change outside a region neither encodes that region again nor asks its questions again; the
views of a frame that need encoding go through the vision encoder as one batch. An ask may name a region;
the image behind an answer is the region's crop.

The agent runs the tiny model on an image-file camera the test rewrites, its left and right halves of
different grey levels, and `CropRecordingEngine` remembers every batch of views it was given.
"""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest

from edge_agent.capture.views import crop, pixel_box
from edge_agent.config import parse_config
from edge_agent.errors import UserError
from edge_agent.mqtt.ask import BadRequest, parse_ask, request_message
from tests.support.agent import RunningAgent, agent_config, topic
from tests.support.broker import wait_until

WIDTH, HEIGHT = 400, 300
LEFT, RIGHT = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]
MIDDLE_RIGHT = [0.5, 0.25, 1.0, 0.75]
REPLY_TOPIC = "regions-test/reply"


def question(question_id: str, region: list[float] | None, **more) -> dict:
    return {"id": question_id, "question": f"Is the {question_id} lit?", "type": "yes_no", "region": region, **more}


def frame(left: int, right: int) -> np.ndarray:
    """A frame whose left half is grey `left` and right half grey `right`, with a gradient and a white square in
    the right half, so a crop taken at the wrong place shows as a large difference."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    image[:, : WIDTH // 2] = left
    image[:, WIDTH // 2 :] = right
    image += np.linspace(0, 40, HEIGHT, dtype=np.float32)[:, None, None]
    image[120:170, 260:330] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


def show(camera, image: np.ndarray) -> None:
    written = camera.with_suffix(".tmp.png")
    cv2.imwrite(str(written), image)
    os.replace(written, camera)


class CropRecordingEngine:
    """The real engine, remembering each batch of views it encoded (as their mean grey levels and shapes)."""

    def __init__(self, engine):
        self._engine = engine
        self.batches: list[list[tuple[float, tuple[int, ...]]]] = []

    def encode_views(self, images):
        self.batches.append([(round(float(image.mean()), 1), image.shape) for image in images])
        return self._engine.encode_views(images)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def run(model, engine, broker, camera, questions: list[dict], **evidence) -> RunningAgent:
    config = agent_config(model, broker, camera, questions=questions, camera={"fps": 10}, mqtt={"heartbeat_s": 0.3})
    return RunningAgent({**config, "evidence": {"max_side": 640, "min_interval_s": 0, **evidence}}, engine=engine)


def mean_of(image: np.ndarray, region: list[float] | None) -> float:
    return round(float(crop(image, tuple(region) if region else None).mean()), 1)


def test_questions_with_one_region_share_a_view_and_the_views_of_a_frame_are_encoded_in_one_batch(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    image = frame(40, 120)
    show(camera, image)
    engine = CropRecordingEngine(tiny_engine)
    questions = [question("left", LEFT), question("right", RIGHT), question("right_again", RIGHT)]
    listener = subscriber(broker, *(topic("answers", q["id"]) for q in questions))
    with run(tiny_llava_int8, engine, broker, camera, questions):
        for q in questions:
            listener.next(topic("answers", q["id"]), timeout=30)

    first = engine.batches[0]
    assert sorted(first) == sorted(
        [(mean_of(image, LEFT), (HEIGHT, WIDTH // 2, 3)), (mean_of(image, RIGHT), (HEIGHT, WIDTH // 2, 3))]
    ), "one batch of two views: the left half, and the right half its two questions share"


def test_a_change_outside_a_region_neither_encodes_it_again_nor_asks_its_questions_and_one_inside_does(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    show(camera, frame(40, 120))
    engine = CropRecordingEngine(tiny_engine)
    questions = [
        question("left", LEFT, trigger="change", every=0.1),
        question("right", RIGHT, trigger="change", every=0.1),
    ]
    left_answers, right_answers = topic("answers", "left"), topic("answers", "right")
    listener = subscriber(broker, left_answers, right_answers)
    with run(tiny_llava_int8, engine, broker, camera, questions):
        listener.next(left_answers, timeout=30)
        listener.next(right_answers, timeout=30)
        time.sleep(0.5)  # past the heartbeat (0.3 s): the next answer is published even if it tells the same
        encoded_before = len(engine.batches)
        changed_at = time.time()
        changed = frame(40, 220)  # only the right half changes
        show(camera, changed)
        wait_until(
            lambda: any(json.loads(m.payload)["frame_ts"] > changed_at for m in listener.on(right_answers)),
            timeout=30,
            what="an answer on the changed right half",
        )
        time.sleep(1.0)  # frames keep coming: a wrongly gated left view would be encoded and asked by now

    encoded_after = [view for batch in engine.batches[encoded_before:] for view in batch]
    assert encoded_after == [(mean_of(changed, RIGHT), (HEIGHT, WIDTH // 2, 3))]
    assert [json.loads(m.payload)["frame_ts"] > changed_at for m in listener.on(left_answers)] == [False]


def test_the_image_behind_an_answer_is_its_regions_crop(tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path):
    camera = tmp_path / "camera.png"
    image = frame(40, 120)
    show(camera, image)
    evidence = topic("evidence", "middle")
    listener = subscriber(broker, evidence)
    with run(tiny_llava_int8, CropRecordingEngine(tiny_engine), broker, camera, [question("middle", MIDDLE_RIGHT)]):
        jpeg = listener.next(evidence, timeout=30).payload

    assert_is_crop(jpeg, image, MIDDLE_RIGHT)


def assert_is_crop(jpeg: bytes, image: np.ndarray, region: list[float]) -> None:
    """The JPEG is exactly `region` of `image` (same size, same pixels up to JPEG's loss), not the whole frame."""
    shown = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    left, top, right, bottom = pixel_box(tuple(region), WIDTH, HEIGHT)
    assert shown.shape == (bottom - top, right - left, 3)
    expected = image[top:bottom, left:right]
    assert np.abs(shown.astype(np.int16) - expected.astype(np.int16)).mean() < 4.0
    whole = cv2.resize(image, shown.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(shown.astype(np.int16) - whole.astype(np.int16)).mean() > 12.0


def test_an_ask_naming_a_region_is_answered_on_that_crop_of_the_newest_frame(
    tiny_llava_int8, tiny_engine, broker, subscriber, tmp_path
):
    camera = tmp_path / "camera.png"
    image = frame(40, 120)
    show(camera, image)
    engine = CropRecordingEngine(tiny_engine)
    listener = subscriber(broker, REPLY_TOPIC, f"{REPLY_TOPIC}/evidence", topic("answers", "left"))
    with run(tiny_llava_int8, engine, broker, camera, [question("left", LEFT)]):
        listener.next(topic("answers", "left"), timeout=30)
        payload, properties = request_message("Is it lit?", REPLY_TOPIC)
        request = {**json.loads(payload), "region": MIDDLE_RIGHT, "evidence": True}
        listener.publish(topic("ask"), json.dumps(request).encode(), properties=properties)
        reply = json.loads(listener.next(REPLY_TOPIC, timeout=30).payload)
        jpeg = listener.next(f"{REPLY_TOPIC}/evidence", timeout=30).payload

    assert reply["type"] == "text" and reply["evidence_topic"] == f"{REPLY_TOPIC}/evidence"
    left, top, right, bottom = pixel_box(tuple(MIDDLE_RIGHT), WIDTH, HEIGHT)
    assert (mean_of(image, MIDDLE_RIGHT), (bottom - top, right - left, 3)) in engine.batches[-1]
    assert_is_crop(jpeg, image, MIDDLE_RIGHT)


@pytest.mark.parametrize(
    ("region", "reason"),
    [
        ([0.5, 0.2, 0.5, 0.6], "must not be empty: x0 < x1 and y0 < y1"),
        ([0.6, 0.2, 0.4, 0.6], "must not be empty: x0 < x1 and y0 < y1"),
        ([0.0, -0.1, 0.5, 0.5], "must lie inside the frame"),
        ([0.0, 0.0, 1.2, 0.5], "must lie inside the frame"),
        ([0.1, 0.2, 0.3], "must be 4 numbers"),
    ],
)
def test_a_region_that_is_not_a_rectangle_inside_the_frame_is_one_line_naming_the_key(region, reason):
    config = {"model": {"path": "models/demo"}, "questions": [question("q", region)]}
    with pytest.raises(UserError, match=rf"^config.yaml: questions\[0\].region: {reason}"):
        parse_config(config)
    with pytest.raises(BadRequest, match=rf"^'region' {reason}"):  # an ask's region, checked alike
        parse_ask(json.dumps({"question": "Is it lit?", "reply_to": "r/1", "region": region}).encode(), None)


@pytest.mark.parametrize("region", ["0,0,1,1", [0, 0, "1", 1], [0, 0, True, 1], {"x0": 0}])
def test_an_ask_region_that_is_not_a_list_of_numbers_is_refused(region):
    with pytest.raises(BadRequest, match=r"^'region' must be a list of 4 numbers"):
        parse_ask(json.dumps({"question": "Is it lit?", "reply_to": "r/1", "region": region}).encode(), None)


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (640, 480), (1920, 1080)])
def test_every_region_crops_at_least_one_pixel_and_every_pixel_it_touches(size):
    width, height = size
    image = np.arange(width * height, dtype=np.int64).reshape(height, width)
    for region in [(0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 0.5001, 0.5001), (0.999, 0.999, 1.0, 1.0), (0.1, 0.2, 0.35, 0.9)]:
        view = crop(image, region)
        assert view.size >= 1
        x0, y0, x1, y1 = region
        assert view[0, 0] % width <= x0 * width and view[0, 0] // width <= y0 * height
        assert view[-1, -1] % width + 1 >= x1 * width and view[-1, -1] // width + 1 >= y1 * height
