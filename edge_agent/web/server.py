"""The status page's HTTP server: the standard library's `ThreadingHTTPServer` on a daemon thread.

Endpoints (every one behind `Guard.admit`; every POST behind `Guard.check_action` too):

| method and path | what |
| --- | --- |
| `GET /` , `/static/app.js`, `/static/app.css` | the page (files shipped in the package) |
| `GET /api/state` | the snapshot (`StatusBoard.snapshot`) and the CSRF token |
| `GET /api/events` | server-sent events: the snapshot every `EVENT_INTERVAL_S` |
| `GET /api/frame/<camera>.jpg` | a camera's newest frame (encoded at most once a second) |
| `GET /api/evidence/<question>.jpg` | the image a question's published value was answered on |
| `POST /api/ask` | an ad hoc question (the MQTT ask format, without a reply address); its answer and image |
| `POST /api/enabled` | `{"question_id", "enabled"}`: a question's switch |
| `POST /api/check` | `{"question_id"}` (null: every question): answer now |
| `POST /api/region` | `{"region": [x0, y0, x1, y1]}`: the checked `region:` line for config.yaml |

Client input is treated as on the MQTT ask path: bounded (`MAX_BODY_BYTES`, connections, streams),
checked by the same functions, rate-limited with the same settings, and answered with one line of JSON
(`{"error": ...}`) and a 4xx status, never a traceback.
"""

from __future__ import annotations

import base64
import http.server
import importlib.resources
import logging
import threading
from typing import Callable
from urllib.parse import urlsplit

from edge_agent.config import MqttSettings, WebSettings, is_loopback, split_host_port
from edge_agent.errors import UserError
from edge_agent.mqtt.ask import AskRefusal, AskRequest, BadRequest, Refusal, json_object, request_from
from edge_agent.mqtt.commands import CHECK, ENABLED, Command
from edge_agent.mqtt.ratelimit import RequestRateLimit
from edge_agent.mqtt.topics import strict_json
from edge_agent.status import StatusBoard
from edge_agent.web.actions import PageReply, command_from, region_line
from edge_agent.web.guard import Guard, Refused

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
"""Largest request body (an ask's JSON is at most this on MQTT too)."""
MAX_CONNECTIONS = 32
"""Connections served at once; more are closed at once."""
MAX_STREAMS = 8
"""Live-update streams open at once (each holds a connection)."""
EVENT_INTERVAL_S = 1.0
"""How often a live-update stream sends the snapshot."""
ASK_TIMEOUT_S = 120.0
"""How long a page ask waits for its answer (the model answers in seconds; the queue holds at most 16)."""
ANSWER_POLL_S = 0.2
"""How often a waiting page ask looks whether the server is stopping."""
SOCKET_TIMEOUT_S = 15.0
"""A client that sends nothing for this long is dropped (a slow request cannot hold a thread)."""
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
REFUSAL_STATUS = {
    Refusal.INVALID: 400,
    Refusal.TOO_LONG: 400,
    Refusal.RATE_LIMITED: 429,
    Refusal.BUSY: 503,
    Refusal.NO_FRAME: 503,
    Refusal.FAILED: 500,
}


class StatusServer:
    """Serves the page; `start()` returns the bound port, `stop()` releases it and ends the live streams.

    `on_ask`, `on_command` and `on_refused` are the agent's own handlers of MQTT asks and commands.
    """

    def __init__(
        self,
        settings: WebSettings,
        board: StatusBoard,
        mqtt: MqttSettings,
        question_ids: frozenset[str],
        *,
        on_ask: Callable[[AskRequest], None],
        on_command: Callable[[Command], None],
        on_refused: Callable[[Refusal], None],
    ):
        self.listen = settings.listen
        self.host, self.port = split_host_port(settings.listen)
        self.guard = Guard(settings.password(), loopback=is_loopback(self.host))
        self.board = board
        self.question_ids = question_ids
        self.on_ask, self.on_command, self.on_refused = on_ask, on_command, on_refused
        self.ask_limit = RequestRateLimit(mqtt.ask_per_minute, mqtt.ask_burst)
        self.command_limit = RequestRateLimit(mqtt.ask_per_minute, mqtt.ask_burst)
        self.mqtt_limit_text = f"{mqtt.ask_per_minute:g} per minute, {mqtt.ask_burst} at once"
        self.stopping = threading.Event()
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.files = {path: (read_static(name), kind) for path, (name, kind) in STATIC.items()}
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        try:
            self._httpd = _Server((self.host, self.port), _Handler, app=self)
        except OSError as error:
            raise UserError(f"web.listen {self.listen!r}: cannot listen there ({error.strerror or error})") from error
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="status-page", daemon=True)
        self._thread.start()
        port = self._httpd.server_address[1]
        log.info("status page on http://%s:%d/", self.host if ":" not in self.host else f"[{self.host}]", port)
        return port

    def stop(self) -> None:
        if self._httpd is None:
            return
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None


def read_static(name: str) -> bytes:
    return importlib.resources.files("edge_agent.web").joinpath("static", name).read_bytes()


class _Server(http.server.ThreadingHTTPServer):
    """A threading server that caps its connections and logs a client's broken connection in one debug line."""

    daemon_threads = True

    def __init__(self, address, handler, app: StatusServer):
        self.address_family = http.server.socket.AF_INET6 if ":" in address[0] else http.server.socket.AF_INET
        self.app = app
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.debug("status page: %d connections open already; closing one from %s", MAX_CONNECTIONS, client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        log.debug("status page: connection from %s ended with an error", client_address[0], exc_info=False)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server_version = "edge-agent"
    sys_version = ""

    @property
    def app(self) -> StatusServer:
        return self.server.app

    def log_message(self, format, *args):
        log.debug("status page: %s %s", self.address_string(), format % args)

    def do_GET(self):
        self._serve(self._get)

    def do_POST(self):
        self._serve(self._post)

    def _serve(self, route: Callable[[str], None]) -> None:
        """Admit the request, route it by path, and turn every refusal into one JSON line."""
        try:
            self.app.guard.admit(self.headers, self.client_address[0])
            route(urlsplit(self.path).path)
        except Refused as refused:
            self._refuse(refused.status, refused.reason)
        except BadRequest as bad:
            self._refuse(400, bad.reason)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception:  # a fault of the agent, not of the request: say so once, keep serving
            log.exception("status page: could not serve %s %.80r", self.command, self.path)
            self._refuse(500, "internal error")

    # -- reading ----------------------------------------------------------------------------------------

    def _get(self, path: str) -> None:
        if path in self.app.files:
            body, kind = self.app.files[path]
            self._send(200, body, kind)
        elif path == "/api/state":
            self._json(200, {**self.app.board.snapshot(), "csrf_token": self.app.guard.csrf_token})
        elif path == "/api/events":
            self._events()
        elif path.startswith("/api/frame/") and path.endswith(".jpg"):
            self._jpeg(self.app.board.frame_jpeg(path[len("/api/frame/") : -len(".jpg")]))
        elif path.startswith("/api/evidence/") and path.endswith(".jpg"):
            self._jpeg(self.app.board.evidence_jpeg(path[len("/api/evidence/") : -len(".jpg")]))
        else:
            self._refuse(404, "not found")

    def _events(self) -> None:
        """Send the snapshot as a server-sent event every `EVENT_INTERVAL_S` until the page or the agent goes."""
        if not self.app.streams.acquire(blocking=False):
            self._refuse(503, f"{MAX_STREAMS} live pages are open already")
            return
        try:
            self.close_connection = True
            self.send_response(200)
            self._headers("text/event-stream")
            self.end_headers()
            while not self.app.stopping.is_set():
                self.wfile.write(f"event: state\ndata: {strict_json(self.app.board.snapshot())}\n\n".encode())
                self.wfile.flush()
                self.app.stopping.wait(EVENT_INTERVAL_S)
        finally:
            self.app.streams.release()

    def _jpeg(self, jpeg: bytes | None) -> None:
        if jpeg is None:
            self._refuse(404, "no such image (yet)")
        else:
            self._send(200, jpeg, "image/jpeg")

    # -- actions ----------------------------------------------------------------------------------------

    def _post(self, path: str) -> None:
        actions = {"/api/ask": self._ask, "/api/enabled": self._command, "/api/check": self._command}
        actions["/api/region"] = lambda _path, fields: self._json(200, region_line(fields))
        action = actions.get(path)
        if action is None:
            self._refuse(404, "not found")
            return
        self.app.guard.check_action(self.headers)
        action(path, json_object(self._body()))

    def _body(self) -> bytes:
        """The request body, at most `MAX_BODY_BYTES`; anything else closes the connection after the refusal."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or not (length and length.isascii() and length.isdigit()):
            raise Refused(411, "a body with a Content-Length is required")
        if len(length) > len(str(MAX_BODY_BYTES)) or int(length) > MAX_BODY_BYTES:
            raise Refused(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    def _ask(self, _path: str, fields: dict) -> None:
        """Hand the ask to the agent's queue as MQTT does (rate first, then the request's checks), and wait
        for its answer and image."""
        if not self.app.ask_limit.allow(self.client_address[0]):
            self._refusal(AskRefusal(Refusal.RATE_LIMITED, f"rate limit: at most {self.app.mqtt_limit_text}"))
            return
        reply = PageReply()
        try:
            request = request_from({**fields, "evidence": True}, reply)
        except BadRequest as bad:
            self._refusal(bad.refusal)
            return
        self.app.on_ask(request)
        waited = 0.0
        while not reply.wait(ANSWER_POLL_S):
            waited += ANSWER_POLL_S
            if self.app.stopping.is_set() or waited >= ASK_TIMEOUT_S:
                self._refuse(503, "no answer: the agent is stopping or busy")
                return
        self._answer(reply)

    def _answer(self, reply: PageReply) -> None:
        message = reply.answer.message
        if isinstance(message, AskRefusal):
            self._json(REFUSAL_STATUS[message.reason], message.fields())
            return
        jpeg = reply.answer.jpeg
        image = None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        self._json(200, {**message.fields(), "evidence_topic": None, "evidence": image})

    def _refusal(self, refusal: AskRefusal) -> None:
        """Count a refusal the page made itself, as the MQTT link counts its own, and tell the page."""
        self.app.on_refused(refusal.reason)
        self._json(REFUSAL_STATUS[refusal.reason], refusal.fields())

    def _command(self, path: str, fields: dict) -> None:
        kind = CHECK if path == "/api/check" else ENABLED
        command = command_from(fields, self.app.question_ids, kind)
        if not self.app.command_limit.allow(kind):
            self._refuse(429, f"rate limit: at most {self.app.mqtt_limit_text}")
            return
        self.app.on_command(command)
        self._json(202, {"queued": True})

    # -- writing ----------------------------------------------------------------------------------------

    def _refuse(self, status: int, reason: str) -> None:
        """Answer with one JSON line and close: a refused request's body may be unread."""
        self.close_connection = True
        extra = {"WWW-Authenticate": 'Basic realm="edge-agent", charset="UTF-8"'} if status == 401 else {}
        self._json(status, {"error": reason}, extra)

    def _json(self, status: int, value: object, extra: dict | None = None) -> None:
        self._send(status, strict_json(value).encode(), "application/json", extra)

    def _send(self, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self._headers(kind, extra)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _headers(self, kind: str, extra: dict | None = None) -> None:
        self.send_header("Content-Type", kind)
        for name, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
