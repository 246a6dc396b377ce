"""The scene gate on synthetic 640x480 scenes: what counts as a change worth encoding again."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from edge_agent.capture import SceneGate
from edge_agent.config import SceneGateSettings

SETTINGS = SceneGateSettings(threshold=0.02, size=64, max_unchanged_s=0)
PERSON = (100, 200)  # width, height in pixels of the figure that walks through the scene


def room(person_x: int | None = None, brightness: float = 1.0, seed: int = 7) -> np.ndarray:
    """A textured room (smooth blotches like furniture and shadows), optionally with a dark figure at x."""
    rng = np.random.default_rng(seed)
    blotches = cv2.resize(rng.uniform(60, 200, (6, 8, 3)).astype(np.float32), (640, 480), interpolation=cv2.INTER_CUBIC)
    if person_x is not None:
        width, height = PERSON
        blotches[480 - height :, person_x : person_x + width] = (30, 30, 40)
    return np.clip(blotches * brightness, 0, 255).astype(np.uint8)


def with_sensor_noise(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def gate_with_reference(reference: np.ndarray, settings: SceneGateSettings = SETTINGS, ts: float = 1000.0) -> SceneGate:
    gate = SceneGate(settings)
    gate.accept(reference, ts)
    return gate


def test_the_first_frame_is_always_a_change():
    assert SceneGate(SETTINGS).changed(room())


def test_the_same_frame_again_is_not_a_change():
    gate = gate_with_reference(room(person_x=100))
    assert not gate.changed(room(person_x=100))
    assert gate.difference(room(person_x=100)) == 0


def test_sensor_noise_stays_under_the_threshold():
    gate = gate_with_reference(with_sensor_noise(room(), sigma=8, seed=1))
    noisy = with_sensor_noise(room(), sigma=8, seed=2)
    assert gate.difference(noisy) < SETTINGS.threshold / 4
    assert not gate.changed(noisy)


def test_a_person_entering_or_moving_is_a_change():
    empty = gate_with_reference(room())
    assert empty.changed(room(person_x=100))

    occupied = gate_with_reference(room(person_x=100))
    assert occupied.changed(room(person_x=300))


def test_a_small_change_in_one_corner_is_a_change_though_the_frame_on_average_barely_differs():
    gate = gate_with_reference(room())
    small_figure = room()
    small_figure[400:470, 20:60] = (30, 30, 40)  # 40 x 70 px: under 1% of the frame
    overall, local = gate.differences(small_figure)
    assert overall < SETTINGS.threshold < local
    assert gate.changed(small_figure)


def test_lights_switched_off_are_a_change_but_exposure_drift_is_not():
    """The gate compares raw brightness on purpose: whether the light is on may be what a question asks."""
    gate = gate_with_reference(room())
    assert gate.changed(room(brightness=0.4))
    assert not gate.changed(room(brightness=1.03))


def test_slow_drift_adds_up_against_the_last_accepted_frame():
    """Each step is small, but the gate compares with the frame last encoded, not the previous frame."""
    gate = gate_with_reference(room(person_x=100))
    steps = [room(person_x=x) for x in range(100, 400, 10)]

    assert all(
        gate_with_reference(before).difference(after) < SETTINGS.threshold for before, after in zip(steps, steps[1:])
    )
    assert gate.changed(steps[-1])


def test_accepting_a_frame_makes_it_the_new_reference():
    gate = gate_with_reference(room())
    moved = room(person_x=300)
    assert gate.changed(moved)

    gate.accept(moved, ts=1001.0)
    assert not gate.changed(moved)


@pytest.mark.parametrize(
    ("max_unchanged_s", "seconds_later", "forced"), [(60, 59, False), (60, 60, True), (0, 1e6, False)]
)
def test_max_unchanged_s_forces_a_fresh_encode_of_an_unchanged_scene(max_unchanged_s, seconds_later, forced):
    settings = SceneGateSettings(threshold=0.02, size=64, max_unchanged_s=max_unchanged_s)
    gate = gate_with_reference(room(), settings, ts=1000.0)
    assert gate.changed(room(), ts=1000.0 + seconds_later) is forced


def test_without_a_time_the_gate_uses_the_wall_clock():
    settings = SceneGateSettings(threshold=0.02, size=64, max_unchanged_s=60)
    assert not gate_with_reference(room(), settings, ts=time.time()).changed(room())
    assert gate_with_reference(room(), settings, ts=time.time() - 61).changed(room())


def test_cost_per_frame_is_tiny_sanity_print(capsys):
    """Not a timing assertion (shared CPU): prints the cost so a regression is visible in `pytest -s`."""
    gate = gate_with_reference(room())
    frame = room(person_x=200)
    calls = 200
    started = time.perf_counter()
    verdicts = [gate.changed(frame) for _ in range(calls)]
    per_call_us = (time.perf_counter() - started) / calls * 1e6
    with capsys.disabled():
        print(f"\nSceneGate.changed on 640x480: {per_call_us:.0f} us per frame")
    assert all(verdicts), "the gate gives the same answer however often it is asked"
