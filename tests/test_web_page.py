"""The status page in a real browser (headless Chromium from Debian, Selenium): the agent runs the shipped demo
model on a still camera image of a synthetic scene with a real broker, and the page shows what MQTT carries,
answers an ask beside the image it was answered on, draws a valid region, and switches a question off.

Screenshots (a phone-ish and a desktop width) are saved under the test's tmp directory; docs/status-page.png
is the desktop one.
"""

from __future__ import annotations

import pathlib
import re

import cv2
import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from edge_agent.config import region_problem
from edge_agent.devtools.demo import DEMO_MODEL, DEMO_QUESTIONS
from edge_agent.devtools.scenes import SyntheticScene, render
from tests.support.agent import RunningAgent, agent_config, topic
from tests.support.broker import wait_until
from tests.support.browser import console_errors, screenshot

REPOSITORY = pathlib.Path(__file__).parents[1]
SCENE = SyntheticScene(door_open=True, people=2, cup_colour="red", bag_colour=None, layout_seed=7)
WAIT_S = 60
PHONE, DESKTOP = (390, 844), (1280, 900)


@pytest.fixture(scope="module")
def demo_agent(module_broker, tmp_path_factory):
    """The agent on the demo model, its camera a still image of `SCENE`, its page on a free loopback port."""
    camera = tmp_path_factory.mktemp("camera") / "scene.png"
    cv2.imwrite(str(camera), render(SCENE, 640, 480, np.random.default_rng(0)))
    config = agent_config(
        REPOSITORY / DEMO_MODEL,
        module_broker,
        camera,
        questions=[dict(question, every=0.5) for question in DEMO_QUESTIONS],
        state_dir=str(tmp_path_factory.mktemp("state")),
    )
    with RunningAgent({**config, "evidence": {"min_interval_s": 0}}) as agent:
        yield agent


@pytest.fixture(scope="module")
def page(demo_agent, browser):
    browser.set_window_size(*DESKTOP)
    browser.get(f"http://127.0.0.1:{demo_agent.web_port}/")
    return browser


def text_of(driver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def wait_for(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda _driver: condition(), message=what)


def test_the_page_shows_the_values_mqtt_carries_and_answers_an_ask_beside_its_image(
    page, demo_agent, module_broker, subscriber, tmp_path
):
    states = {question["id"]: topic("state", question["id"]) for question in DEMO_QUESTIONS}
    listener = subscriber(module_broker, *states.values())

    def mqtt_states() -> dict[str, str]:
        return {qid: listener.on(t)[-1].payload.decode() for qid, t in states.items() if listener.on(t)}

    def page_states() -> dict[str, str]:
        values = page.find_elements(By.CSS_SELECTOR, ".question")
        return {
            view.get_attribute("data-question"): view.find_element(By.CSS_SELECTOR, ".value").text for view in values
        }

    wait_for(page, lambda: len(mqtt_states()) == len(states) and page_states() == mqtt_states(), "page = MQTT")
    assert mqtt_states() == {"door_open": "ON", "people": "2", "bag": "OFF", "cup_colour": "red"}
    wait_for(
        page, lambda: page.execute_script("return document.querySelector('.frame-image').naturalWidth") > 0, "frame"
    )

    page.find_element(By.ID, "ask-question").send_keys("Is the door open?")
    page.find_element(By.CSS_SELECTOR, "#ask-type option[value=yes_no]").click()
    page.find_element(By.ID, "ask-button").click()
    wait_for(page, lambda: page.find_element(By.ID, "ask-result").is_displayed(), "an answer")
    assert text_of(page, "#ask-answer") == "yes"
    image = page.find_element(By.ID, "ask-image")
    assert image.get_attribute("src").startswith("data:image/jpeg;base64,")
    assert page.execute_script("return arguments[0].naturalWidth", image) > 0

    screenshot(page, tmp_path / "status-page-phone.png", *PHONE)
    screenshot(page, tmp_path / "status-page-desktop.png", *DESKTOP)
    page.set_window_size(*DESKTOP)
    assert console_errors(page) == []


def test_the_region_helper_gives_a_valid_region_and_a_switch_disables_a_question(
    page, demo_agent, module_broker, subscriber
):
    canvas = page.find_element(By.CSS_SELECTOR, ".frame-draw")
    width, height = canvas.size["width"], canvas.size["height"]
    drag = ActionChains(page).move_to_element_with_offset(canvas, -width // 4, -height // 4).click_and_hold()
    drag.move_by_offset(width // 4, height // 3).release().perform()  # from (1/4, 1/4) to (1/2, 7/12)
    wait_for(page, lambda: text_of(page, ".region-line").startswith("region: ["), "a region line")
    region = [float(edge) for edge in re.fullmatch(r"region: \[(.*)\]", text_of(page, ".region-line"))[1].split(",")]
    assert region_problem(tuple(region)) is None
    assert np.allclose(region, [0.25, 0.25, 0.5, 7 / 12], atol=0.02)

    listener = subscriber(module_broker, topic("enabled", "bag"))
    wait_until(lambda: [m.payload for m in listener.on(topic("enabled", "bag"))] == [b"ON"], what="bag ON")
    page.find_element(By.CSS_SELECTOR, "[data-question=bag] .enabled").click()
    wait_until(lambda: listener.on(topic("enabled", "bag"))[-1].payload == b"OFF", what="bag OFF on MQTT")
    question = page.find_element(By.CSS_SELECTOR, "[data-question=bag]")
    wait_for(page, lambda: "disabled" in question.get_attribute("class"), "the page shows it off")
    assert console_errors(page) == []


@pytest.fixture(scope="module")
def two_camera_page(module_broker, browser, tmp_path_factory):
    """The demo model on two still cameras, `front` with its door open and `back` with its door closed."""
    folder = tmp_path_factory.mktemp("cameras")
    cameras = []
    for camera_id, door_open in (("front", True), ("back", False)):
        image = folder / f"{camera_id}.png"
        scene = SyntheticScene(door_open=door_open, people=1, cup_colour="blue", bag_colour=None, layout_seed=3)
        cv2.imwrite(str(image), render(scene, 640, 480, np.random.default_rng(0)))
        door = dict(DEMO_QUESTIONS[0], id=f"{camera_id}_door", every=0.5)
        cameras.append({"id": camera_id, "source": str(image), "loop": True, "fps": 5, "questions": [door]})
    config = agent_config(REPOSITORY / DEMO_MODEL, module_broker, "unused", state_dir=str(folder / "state"))
    del config["camera"], config["questions"]
    with RunningAgent({**config, "cameras": cameras}) as agent:
        browser.set_window_size(*DESKTOP)
        browser.get(f"http://127.0.0.1:{agent.web_port}/")
        yield browser


def ask_door(page) -> str:
    """Ask the page whether the door is open, as a yes/no question, and return the answer it shows."""
    page.find_element(By.ID, "ask-result").is_displayed() and page.execute_script(
        "document.getElementById('ask-result').hidden = true"
    )
    question = page.find_element(By.ID, "ask-question")
    question.clear()
    question.send_keys("Is the door open?")
    page.find_element(By.CSS_SELECTOR, "#ask-type option[value=yes_no]").click()
    page.find_element(By.ID, "ask-button").click()
    wait_for(page, lambda: page.find_element(By.ID, "ask-result").is_displayed(), "an answer")
    return text_of(page, "#ask-answer")


def test_with_two_cameras_the_page_shows_both_and_asks_the_camera_chosen_or_drawn_on(two_camera_page):
    page = two_camera_page
    wait_for(page, lambda: len(page.find_elements(By.CSS_SELECTOR, ".camera")) == 2, "two cameras")
    wait_for(
        page,
        lambda: page.execute_script(
            "return [...document.querySelectorAll('.frame-image')].every((image) => image.naturalWidth > 0)"
        ),
        "both frames",
    )
    assert "camera front" in text_of(page, "[data-question=front_door] .detail")

    page.find_element(By.CSS_SELECTOR, "#ask-camera option[value=front]").click()
    assert ask_door(page) == "yes"

    back = page.find_element(By.CSS_SELECTOR, "[data-camera=back] .frame-draw")
    width, height = back.size["width"], back.size["height"]
    drag = ActionChains(page).move_to_element_with_offset(back, -width // 2 + 2, -height // 2 + 2).click_and_hold()
    drag.move_by_offset(width // 2, height - 4).release().perform()
    wait_for(page, lambda: page.find_element(By.ID, "ask-camera").get_attribute("value") == "back", "back chosen")
    assert ask_door(page) == "no"  # the demo model reads doors on whole frames: the region only chose the camera
    assert console_errors(page) == []
