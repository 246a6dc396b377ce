"""A real Home Assistant as a test peer: started on a loopback port, onboarded headlessly, MQTT added by
config flow, so tests can check what it makes of the agent's discovery configs, states and last will.

Home Assistant 2024.3.3 is the newest release that installs on Python 3.11. It lives in its own virtual
environment, `<repo>/.cache/homeassistant-venv-2024.3.3/`, built once: `python -m tests.support.homeassistant`
(scripts/test.sh runs it before pytest) or the first test that needs it. It runs with `--skip-pip`, so it
never installs anything while tests run: the build installs the requirements of every integration it
loads, at the versions its own package constraints pin.

Fixtures:
- `home_assistant_broker`: a mosquitto for the session; Home Assistant's MQTT integration is connected to it.
- `home_assistant`: a started, onboarded Home Assistant (`HomeAssistant`) whose MQTT integration uses
  `home_assistant_broker`; stopped at the end of the session. Agents under test must use distinct agent ids,
  since their retained configs stay on the broker for the whole session.
In CI (`CI=true`) a Home Assistant that cannot be built fails the tests; elsewhere it skips them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterator

import pytest
from websockets.sync.client import connect

from edge_agent.devtools.loopback import free_port
from tests.support.broker import Broker, Subscriber

REPO = pathlib.Path(__file__).resolve().parents[2]
VERSION = "2024.3.3"
REQUIREMENTS = (f"homeassistant=={VERSION}", "josepy<2")
"""With josepy 2.x every HTTP request of this release returns 500 (hass_nabucasa's acme needs josepy 1)."""
VENV = REPO / ".cache" / f"homeassistant-venv-{VERSION}"
PYTHON = VENV / "bin" / "python"
BUILT = VENV / ".built"
"""Written last by the build: a venv without it is an interrupted build."""
CONFIGURED_INTEGRATIONS = ("http", "api", "config", "onboarding", "websocket_api", "logger", "mqtt")
"""The integrations `configuration.yaml` sets up, and MQTT, which the config flow adds."""
UNDECLARED_INTEGRATIONS = ("stream",)
"""Integrations imported by loaded ones without being declared in their manifests (camera imports stream)."""

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
STATE_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.25
USER = {"name": "Test", "username": "test", "password": "edge-agent-test", "language": "en"}

_LOADED_REQUIREMENTS = """
import json, pathlib, sys
import homeassistant.bootstrap as bootstrap
from homeassistant.components.mqtt.const import PLATFORMS as MQTT_PLATFORMS
components = pathlib.Path(bootstrap.__file__).parent / "components"
pending = {*sys.argv[1:], *bootstrap.DEFAULT_INTEGRATIONS, *bootstrap.CORE_INTEGRATIONS, *MQTT_PLATFORMS}
loaded, requirements = set(), set()
while pending:
    domain = pending.pop()
    if domain not in loaded:
        loaded.add(domain)
        manifest = json.loads((components / domain / "manifest.json").read_text())
        requirements.update(manifest.get("requirements", []))
        pending.update(manifest.get("dependencies", []) + manifest.get("after_dependencies", []))
constraints = pathlib.Path(bootstrap.__file__).parent / "package_constraints.txt"
print(json.dumps({"requirements": sorted(requirements), "constraints": str(constraints)}))
"""
"""Prints the requirements of every integration Home Assistant loads here, and the file of its own version
pins. It loads the integrations named as arguments, its default ones, every entity platform of MQTT (set up
with the MQTT config entry) and the dependencies of all, after-dependencies included (their modules are
imported too)."""


class BuildError(Exception):
    """The Home Assistant environment could not be built."""


def ensure_environment() -> pathlib.Path:
    """The Python of the Home Assistant environment, built first unless a complete build is there."""
    with _lock(VENV.with_name(VENV.name + ".lock")):
        if not _works():
            _build()
    return PYTHON


@contextlib.contextmanager
def _lock(path: pathlib.Path) -> Iterator[None]:
    """Serialise builds across test processes sharing the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _works() -> bool:
    return (
        BUILT.exists()
        and subprocess.run([PYTHON, "-c", "import homeassistant, josepy, paho.mqtt"], capture_output=True).returncode
        == 0
    )


def _build() -> None:
    shutil.rmtree(VENV, ignore_errors=True)
    _run(sys.executable, "-m", "venv", str(VENV))
    _run(str(PYTHON), "-m", "pip", "install", "-q", *REQUIREMENTS)
    loaded = json.loads(
        _run(str(PYTHON), "-c", _LOADED_REQUIREMENTS, *CONFIGURED_INTEGRATIONS, *UNDECLARED_INTEGRATIONS)
    )
    _run(str(PYTHON), "-m", "pip", "install", "-q", "-c", loaded["constraints"], *loaded["requirements"])
    BUILT.write_text(json.dumps([*REQUIREMENTS, *loaded["requirements"]]) + "\n")


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last_lines = [line for line in done.stderr.splitlines() if not line.startswith("WARNING:")][-3:]
        raise BuildError(f"{' '.join(command[:4])} ... failed: {' | '.join(last_lines)}")
    return done.stdout


def poll(fetch: Callable[[], object], done: Callable[[object], bool], timeout: float, what: str) -> object:
    """The first value of `fetch()` that `done` accepts, fetched every POLL_INTERVAL_S until `timeout`."""
    deadline = time.monotonic() + timeout
    while not done(value := fetch()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not as expected within {timeout} s; last seen: {value}")
        time.sleep(POLL_INTERVAL_S)
    return value


class HomeAssistant:
    """One Home Assistant process with a fresh config dir, spoken to over its REST and websocket APIs."""

    host = "127.0.0.1"

    def __init__(self, python: pathlib.Path, config_dir: pathlib.Path):
        self.python = python
        self.config_dir = config_dir
        self.port = free_port()
        self.url = f"http://{self.host}:{self.port}"
        self._token: str | None = None
        self._process: subprocess.Popen | None = None

    # Lifecycle

    def start(self) -> None:
        """Start the process and wait until its HTTP API answers."""
        (self.config_dir / "configuration.yaml").write_text(self._configuration())
        with open(self.config_dir / "stdout.log", "w") as output:
            self._process = subprocess.Popen(
                [str(self.python), "-m", "homeassistant", "-c", str(self.config_dir), "--skip-pip", "--log-no-color"],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._status("GET", "/api/onboarding")[0] != 200:
            if self._process.poll() is not None or time.monotonic() > deadline or self._in_recovery_mode():
                raise RuntimeError(f"Home Assistant did not start: see {self.config_dir}/home-assistant.log")
            time.sleep(POLL_INTERVAL_S)

    def _in_recovery_mode(self) -> bool:
        """Whether an integration failed to load and Home Assistant fell back to recovery mode, which ignores
        the config (and so never listens on our port)."""
        log = self.config_dir / "home-assistant.log"
        return log.exists() and "Activating recovery mode" in self.log()

    def _configuration(self) -> str:
        """A minimal config: no `default_config` and no location detection, which would call the internet."""
        return (
            "homeassistant:\n  name: edge-agent test\n  time_zone: UTC\n  unit_system: metric\n  country: DE\n"
            "  latitude: 0\n  longitude: 0\n  elevation: 0\n  currency: EUR\n"
            f"http:\n  server_host: {self.host}\n  server_port: {self.port}\n"
            "api:\nconfig:\nonboarding:\nwebsocket_api:\n"
            "logger:\n  default: warning\n  logs:\n    homeassistant.components.mqtt: info\n"
        )

    def onboard(self) -> None:
        """Create the owner and log in as the frontend would, with a long-lived token for the session."""
        client_id = f"{self.url}/"
        created = self._post("/api/onboarding/users", {"client_id": client_id, **USER}, auth=False)
        tokens = self._post(
            "/auth/token",
            {"grant_type": "authorization_code", "code": created["auth_code"], "client_id": client_id},
            auth=False,
            form=True,
        )
        self._token = tokens["access_token"]
        self._post("/api/onboarding/analytics", {})
        self._post(
            "/api/onboarding/integration", {"client_id": client_id, "redirect_uri": f"{self.url}/?auth_callback=1"}
        )
        self._token = self.websocket(
            {"type": "auth/long_lived_access_token", "client_name": "edge-agent tests", "lifespan": 1}
        )

    def add_mqtt(self, broker: Broker) -> None:
        """Add the MQTT integration by its config flow; return once Home Assistant announced itself online."""
        status = Subscriber(broker.host, broker.port, ("homeassistant/status",))
        try:
            flow = self._post("/api/config/config_entries/flow", {"handler": "mqtt"})
            result = self._post(
                f"/api/config/config_entries/flow/{flow['flow_id']}", {"broker": broker.host, "port": broker.port}
            )
            assert result["type"] == "create_entry", f"MQTT config flow ended with {result}"
            assert status.next("homeassistant/status", timeout=START_TIMEOUT_S).payload == b"online"
        finally:
            status.close()

    def stop(self) -> None:
        """Stop cleanly (SIGTERM), killed if it takes longer than STOP_TIMEOUT_S."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    # What tests ask

    def states(self) -> list[dict]:
        """Every entity's state object (`entity_id`, `state`, `attributes`, ...)."""
        return self._get("/api/states")

    def state(self, entity_id: str) -> dict | None:
        """The state object of one entity, or None if Home Assistant has no such entity."""
        status, body = self._status("GET", f"/api/states/{entity_id}")
        if status == 404:
            return None
        assert status == 200, f"GET state of {entity_id}: HTTP {status} {body[:200]!r}"
        return json.loads(body)

    def wait_for_state(
        self, entity_id: str, predicate: Callable[[dict], bool], timeout: float = STATE_TIMEOUT_S
    ) -> dict:
        """The first state object of `entity_id` that satisfies `predicate`."""
        return poll(
            lambda: self.state(entity_id), lambda state: state is not None and predicate(state), timeout, what=entity_id
        )

    def call_service(self, domain: str, service: str, data: dict | None = None) -> list[dict]:
        """Call a service; returns the states it changed."""
        return self._post(f"/api/services/{domain}/{service}", data or {})

    def entity_ids(self, platform: str = "mqtt") -> dict[str, str]:
        """unique_id -> entity_id of every registered entity of an integration (the entity registry)."""
        entries = self.websocket({"type": "config/entity_registry/list"})
        return {entry["unique_id"]: entry["entity_id"] for entry in entries if entry["platform"] == platform}

    def device(self, identifier: str) -> dict | None:
        """The device registry entry with this identifier (of any integration), or None."""
        devices = self.websocket({"type": "config/device_registry/list"})
        return next((device for device in devices if any(identifier in pair for pair in device["identifiers"])), None)

    def wait_for_entities(self, unique_ids: list[str], timeout: float = STATE_TIMEOUT_S) -> dict[str, str]:
        """unique_id -> entity_id of MQTT entities, once every one of `unique_ids` is registered."""
        return poll(
            self.entity_ids,
            lambda registered: set(unique_ids) <= registered.keys(),
            timeout,
            what=f"entities {unique_ids}",
        )

    def image(self, entity_id: str) -> bytes:
        """The picture an image entity shows, as the frontend fetches it (`/api/image_proxy/<entity_id>`)."""
        status, body = self._status("GET", f"/api/image_proxy/{entity_id}")
        assert status == 200, f"GET image of {entity_id}: HTTP {status} {body[:200]!r}"
        return body

    def websocket(self, command: dict) -> object:
        """The result of one websocket API command (sent on its own authenticated connection)."""
        with connect(f"ws://{self.host}:{self.port}/api/websocket", open_timeout=REQUEST_TIMEOUT_S) as connection:
            connection.recv(REQUEST_TIMEOUT_S)  # auth_required
            connection.send(json.dumps({"type": "auth", "access_token": self._token}))
            assert json.loads(connection.recv(REQUEST_TIMEOUT_S))["type"] == "auth_ok", "websocket auth refused"
            connection.send(json.dumps({"id": 1, **command}))
            reply = json.loads(connection.recv(REQUEST_TIMEOUT_S))
        assert reply["success"], f"websocket {command['type']}: {reply.get('error')}"
        return reply["result"]

    def log(self) -> str:
        """Home Assistant's own log so far."""
        return (self.config_dir / "home-assistant.log").read_text(errors="replace")

    def problems(self, since: int = 0) -> list[str]:
        """The WARNING and ERROR lines of the log after its first `since` characters (a `len(log())`)."""
        return [line for line in self.log()[since:].splitlines() if " WARNING (" in line or " ERROR (" in line]

    # HTTP

    def _get(self, path: str) -> object:
        return self._checked("GET", path)

    def _post(self, path: str, body: dict, auth: bool = True, form: bool = False) -> object:
        return self._checked("POST", path, body, auth, form)

    def _checked(
        self, method: str, path: str, body: dict | None = None, auth: bool = True, form: bool = False
    ) -> object:
        status, reply = self._status(method, path, body, auth, form)
        assert 200 <= status < 300, f"{method} {path}: HTTP {status} {reply[:300]!r}"
        return json.loads(reply)

    def _status(
        self, method: str, path: str, body: dict | None = None, auth: bool = True, form: bool = False
    ) -> tuple[int, bytes]:
        """HTTP status and body of one request; status 0 if nothing listens yet."""
        headers = {"Authorization": f"Bearer {self._token}"} if auth and self._token else {}
        data = None
        if body is not None:
            data = urllib.parse.urlencode(body).encode() if form else json.dumps(body).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded" if form else "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (ConnectionError, urllib.error.URLError):
            return 0, b""


@pytest.fixture(scope="session")
def home_assistant_python() -> pathlib.Path:
    """The built Home Assistant environment's Python; fails in CI, skips elsewhere if it cannot be built."""
    try:
        return ensure_environment()
    except BuildError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Home Assistant environment in CI: {error}")
        pytest.skip(f"no Home Assistant to test against (python -m tests.support.homeassistant builds it): {error}")


@pytest.fixture(scope="session")
def home_assistant_broker(tmp_path_factory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("mosquitto-ha"), persistence=False)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def home_assistant(home_assistant_python, home_assistant_broker, tmp_path_factory) -> Iterator[HomeAssistant]:
    home_assistant = HomeAssistant(home_assistant_python, tmp_path_factory.mktemp("homeassistant"))
    try:
        home_assistant.start()
        home_assistant.onboard()
        home_assistant.add_mqtt(home_assistant_broker)
        yield home_assistant
    finally:
        home_assistant.stop()


def main() -> None:
    started = time.monotonic()
    try:
        python = ensure_environment()
    except BuildError as error:
        sys.exit(f"Home Assistant {VERSION}: {error}")
    print(f"Home Assistant {VERSION}: {python} (ready after {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
