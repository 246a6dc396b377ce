"""The agent loop: camera frame -> views (regions) -> scene gate -> engine -> typed answers -> MQTT.

One thread does all inference, so the engine is never used concurrently. Each turn it takes the newest
frame and, for each view of it (`edge_agent.scene`: a region the questions name, and the whole frame), asks
the view's scene gate whether anything changed there and lets `edge_agent.loop.decide` say what the turn
does with the view's standing questions due and the ad hoc questions waiting for it (queued by the network
thread). A changed view is encoded once (vision encoder + prompt prefix), and only when something is to be
answered on it; the views of a frame that need encoding go through the vision encoder together. Every due
question and waiting ask of a view is then answered on that one context. On an unchanged view nothing is
encoded: a due question reuses the answer it already has for the current context, or is answered on the
cached context, and so is an ask. So an answer always describes the scene the camera shows now in the
question's view, as far as the gate can tell. An ask naming a region no question uses is answered on that
region of the newest frame, encoded for it.

The times of every published answer and ask reply: `frame_ts` is the capture time of the newest frame
known to show the answered scene (the frame encoded, or a later frame the gate found unchanged), never a
frame of another scene; `answered_ts` is when the agent gave that answer for that frame (for a reused
answer: when it was reused); `latency_ms` is the time between the two.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
import typing

from . import systemd
from .capture import CameraReader, DeviceMissing, validate_source
from .capture.reader import Frame
from .config import CameraEntry, Config, InvalidValue, Question, usable_cache_dir, usable_state_dir
from .controls import Controls
from .engine import Answer, Engine, FrameContext, Prompt
from .engine.engine import in_background
from .errors import UserError
from .evidence import EvidenceLog, EvidencePacer, evidence_jpeg
from .loop import Turn, decide
from .metrics import Metrics
from .mqtt import AgentLink, AnswerMessage, EntitySpec
from .mqtt.ask import ANSWERED, AskRefusal, AskReply, AskRequest, Refusal
from .mqtt.commands import CHECK, Command
from .questions import build_prompt, kind_of, parse_answer, state_string
from .scene import Scene, View, views_of
from .stable import StableState
from .status import StatusBoard
from .web import PageReply, StatusServer

log = logging.getLogger(__name__)

MIB = 1024 * 1024
ASK_QUEUE_LIMIT = 16
"""Ad hoc questions waiting to be answered; more are refused as `Refusal.BUSY`."""
ASK_QUESTION_TOKEN_LIMIT = 160
"""Longest ad hoc question in model tokens (its prompt cost grows with them); the request format's
character cap alone would let 500 emoji become about 2,000 byte-level tokens."""
MAX_OPTION_TOKENS = 32
"""Longest spelling of an option in model tokens (each spelling is scored token by token). 80 characters of
words take about 20 tokens; the character cap alone would let 80 emoji become about 320 byte-level tokens."""
MAX_PROMPT_TOKENS = 768
"""Longest question prompt in model tokens after the shared image prefix: the question, a choice's options
and the instruction as the chat template renders them. Every token of it is prefilled and read by every
decode step; 768 holds a 160-token question with 20 options of 20 to 30 tokens, and keeps the prompt of
one question near the size of LLaVA-1.5's 576 image tokens."""
COMMAND_QUEUE_LIMIT = 32
"""Switch flips and presses waiting for the next turn; more are dropped (the link's rate limit on commands
keeps them far fewer)."""
FRAME_WAIT_S = 0.2
"""How long the loop waits for a new frame of any camera before it looks at pending ad hoc questions again."""
LOAD_WAIT_S = 0.1
"""How often a start waiting for the model load checks whether it was asked to stop."""
CAMERA_STOP_WAIT_S = 1.0
"""How long a shutdown waits for each camera reader to let go of its source. A reader stuck in a camera
open or read (up to `open_timeout_s` or `read_timeout_s`) is left behind: it is a daemon thread."""


def load_engine(config: Config) -> Engine:
    """The configured model, its vision encoder compiled for batches of views when the questions name regions or
    the agent has several cameras."""
    model = config.model
    regions = any(question.region is not None for question in config.all_questions)
    return Engine.load(
        model.path,
        device=model.device,
        vision_device=model.vision_device,
        language_device=model.language_device,
        cache_dir=usable_cache_dir(model.cache_dir),
        batch_views=regions or config.several_cameras,
    )


class CameraFeed:
    """One camera of the agent: its reader thread, the views its questions name, and the last frame the loop took.

    Each reader runs on its own thread, so an offline or hung camera delays no other; every new frame wakes
    the loop through `wake`, which the loop waits on once for all cameras."""

    def __init__(self, entry: CameraEntry, wake: threading.Event, on_status: typing.Callable[[str, bool], None]):
        self.id = entry.id
        self.entry = entry
        self.views = views_of(entry.questions, entry.scene_gate)
        self.reader = CameraReader(entry, on_status=lambda online: on_status(self.id, online), on_frame=wake.set)
        self.last_seq = -1

    def take_frame(self) -> Frame | None:
        """The camera's newest frame if the loop has not taken it yet (never waits)."""
        frame = self.reader.latest(after_seq=self.last_seq)
        if frame is not None:
            self.last_seq = frame.seq
        return frame


@dataclasses.dataclass
class ViewTurn:
    """What one turn does in one view: `decide`'s turn, and what it answers there."""

    feed: CameraFeed
    view: View
    turn: Turn
    due: list[Question]  # standing questions to answer: due, pressed (check now) and re-checked
    asks: list[AskRequest]  # ad hoc questions on this view
    pressed: list[Question]  # questions a check-now asks for: published even when unchanged


class Agent:
    """Wires capture, gate, engine, questions and MQTT; `run()` blocks until `stop()`."""

    def __init__(self, config: Config, engine: Engine | None = None):
        self.config = config
        self.metrics = Metrics()
        self.watchdog = systemd.Watchdog.from_environment()
        self._engine = engine
        self.metrics_port: int | None = None  # where the metrics endpoint listens, once started
        self.web_port: int | None = None  # where the status page listens, once started
        self.board = StatusBoard(config, self.metrics)
        self._web: StatusServer | None = None
        self._stopped = threading.Event()
        self._asks: queue.Queue[AskRequest] = queue.Queue(maxsize=ASK_QUEUE_LIMIT)
        self._commands: queue.Queue[Command] = queue.Queue(maxsize=COMMAND_QUEUE_LIMIT)
        self._frame_arrived = threading.Event()
        self._feeds = [CameraFeed(entry, self._frame_arrived, self._on_camera_status) for entry in config.all_cameras]
        self._views = [view for feed in self._feeds for view in feed.views.values()]
        self._view_of = {q.id: view for view in self._views for q in view.schedule.questions}
        self._stable = {q.id: StableState.for_question(q, config.question_defaults) for q in config.all_questions}
        self._controls = Controls(question.id for question in config.all_questions)
        self._evidence_log = EvidenceLog()
        self._evidence_pacer = EvidencePacer(config.evidence.min_interval_s)
        self._contexts = ContextBudget(int(config.model.context_budget_mb * MIB), self._views)
        self._round = 0  # turns taken: which camera goes first in the next one
        self._link: AgentLink | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> bool:
        """Check the source, load the model, connect, and start reading frames.

        Returns False, having announced nothing (no `online`, no READY), when `stop()` is called while the
        model loads; the load then still runs on its thread, which nothing can interrupt (see `run_agent`).
        """
        for feed in self._feeds:
            try:
                validate_source(feed.entry)
            except DeviceMissing as missing:  # unplugged at boot: run offline and keep retrying
                log.warning("%s; starting with the %s offline", missing, self._camera_name(feed.id))
        self._load_controls()
        systemd.status("loading model")
        if self._engine is None:
            self._engine = self._load_engine()
            if self._engine is None:
                return False
        check_prompt_lengths(self._engine, self.config)
        if self.config.metrics.listen:
            self.metrics_port = self.metrics.serve(self.config.metrics.listen)
        self._link = AgentLink(
            self.config.mqtt,
            self.config.agent_id,
            on_ask=self._enqueue_ask,
            model_name=self._engine.name,
            on_refused=self._count_refusal,
            on_command=self._enqueue_command,
        )
        self._link.start()
        self._link.set_entities(
            [entity_spec(q, self._camera_label(feed)) for feed in self._feeds for q in feed.entry.questions],
            evidence=self.config.evidence.enabled,
            cameras=tuple(self._camera_label(feed) for feed in self._feeds),
        )
        for question_id, enabled in self._controls.states.items():
            self._link.publish_enabled(question_id, enabled)
            self.board.enabled(question_id, enabled)
        self.metrics.add_cameras([feed.id for feed in self._feeds])
        self.board.started(self._engine.name, cameras={feed.id: feed.reader.latest for feed in self._feeds})
        for feed in self._feeds:
            feed.reader.start()
        self._start_web()
        for loop in ("capture", "inference"):
            self.watchdog.register(loop)
        self.watchdog.start()
        systemd.ready()
        systemd.status(f"answering {len(self.config.all_questions)} questions")
        log.info(
            "agent %s started: model %s, %d questions in %d views of %d cameras",
            self.config.agent_id,
            self._engine.name,
            len(self.config.all_questions),
            len([view for view in self._views if view.schedule.questions]),
            len(self._feeds),
        )
        return True

    def _start_web(self) -> None:
        """Serve the status page, whose asks and commands take the same paths as MQTT's."""
        if not self.config.web.enabled:
            return
        self._web = StatusServer(
            self.config.web,
            self.board,
            self.config.mqtt,
            frozenset(question.id for question in self.config.all_questions),
            on_ask=self._enqueue_ask,
            on_command=self._enqueue_command,
            on_refused=self._count_refusal,
        )
        self.web_port = self._web.start()

    def _load_controls(self) -> None:
        """Which questions are enabled, as saved in the state directory (all, without a saved state)."""
        question_ids = [question.id for question in self.config.all_questions]
        self._controls = Controls.load(question_ids, usable_state_dir(self.config.state_dir))
        for question_id, enabled in self._controls.states.items():
            self._view_of[question_id].schedule.set_enabled(question_id, enabled)
            if not enabled:
                log.info("question %s is disabled (its switch is off)", question_id)

    def _load_engine(self) -> Engine | None:
        """The loaded model, or None when `stop()` came first.

        An OpenVINO compile (minutes on a first start of a large model) cannot be interrupted, and a signal
        handler only runs once the main thread is back in Python: so the load runs on a thread of its own
        while this thread waits in short, interruptible waits and looks at the stop flag in between. The
        flag is only read here, never waited on: `stop()` runs in a signal handler and sets it.
        """
        loading = in_background(load_engine, self.config)
        while not (loading.done() or self._stopped.is_set()):
            concurrent.futures.wait([loading], timeout=LOAD_WAIT_S)
        if self._stopped.is_set():
            log.info("stopped while the model was loading: nothing was announced")
            return None
        return loading.result()

    def run(self) -> None:
        """The inference loop, until `stop()`."""
        while not self._stopped.is_set():
            self.step()

    def stop(self) -> None:
        """Ask the loop to finish; `shutdown()` then releases everything."""
        self._stopped.set()

    def shutdown(self) -> None:
        systemd.stopping()
        self.watchdog.stop()
        for feed in self._feeds:
            feed.reader.stop(timeout=CAMERA_STOP_WAIT_S)
        if self._web is not None:
            self._web.stop()
        if self._link is not None:
            self._link.stop()
        self.metrics.stop()
        log.info("agent %s stopped", self.config.agent_id)

    # -- one turn of the loop ----------------------------------------------------------------------------

    def step(self) -> None:
        """One turn: take every camera's new frame, look at it in each of the camera's views, `decide` what each
        view needs, encode the views that need it in one batch, and answer.

        Every turn serves every camera, so a camera whose scene changes all the time adds its own views to
        each batch but never delays another camera's answers by more than that one turn; the cameras take
        turns at going first."""
        self.watchdog.idle("inference")
        pressed = self._apply_commands()
        frames = self._new_frames()
        self.watchdog.progress("inference")
        self._report_capture_health(frames)
        asks = self._asks_by_camera(self._take_asks(self._asks.qsize()))
        turns = [
            self._plan(feed, view, frames[feed.id], pressed, asks[feed.id])
            for feed in self._camera_order()
            for view in self._views_asked(feed, asks[feed.id])
        ]
        self._encode([turn for turn in turns if turn.turn is Turn.ENCODE])
        for turn in turns:
            self._take_turn(turn)
        self._contexts.trim()
        self._publish_evidence()
        self._update_link_metrics()

    def _new_frames(self) -> dict[str, Frame | None]:
        """Camera id -> its frame the loop has not seen yet, or None; waits (once, for all cameras) up to
        `FRAME_WAIT_S` for the first new frame of any camera."""
        self._frame_arrived.wait(FRAME_WAIT_S)
        self._frame_arrived.clear()
        frames = {feed.id: feed.take_frame() for feed in self._feeds}
        for feed in self._feeds:
            if frames[feed.id] is not None:
                self.metrics.frame(feed.id)
        return frames

    def _camera_order(self) -> list[CameraFeed]:
        """The cameras, starting one further each turn (round robin)."""
        self._round += 1
        start = self._round % len(self._feeds)
        return self._feeds[start:] + self._feeds[:start]

    def _asks_by_camera(self, asks: list[AskRequest]) -> dict[str, list[AskRequest]]:
        """Camera id -> the asks it answers (those naming no camera go to the first); asks naming a camera the
        agent does not have are refused."""
        by_camera: dict[str, list[AskRequest]] = {feed.id: [] for feed in self._feeds}
        for request in asks:
            camera = request.camera or self._feeds[0].id
            if camera in by_camera:
                by_camera[camera].append(request)
            else:
                known = ", ".join(by_camera)
                self._refuse_ask(request, AskRefusal(Refusal.INVALID, f"'camera' must be one of {known}"))
        return by_camera

    def _views_asked(self, feed: CameraFeed, asks: list[AskRequest]) -> list[View]:
        """The camera's standing views, and a view of its own for each region asks name that no question does
        (it has no context yet: `_plan` has the newest frame encoded for it, if there is one)."""
        regions = dict.fromkeys(request.region for request in asks if request.region not in feed.views)
        return [*feed.views.values(), *(View(region, [], feed.entry.scene_gate) for region in regions)]

    def _plan(
        self, feed: CameraFeed, view: View, frame: Frame | None, pressed: list[Question], asks: list[AskRequest]
    ) -> ViewTurn:
        """Gate the view of the camera's new frame (if one came), and `decide` what the turn does in it."""
        due = view.look(frame, time.monotonic()) if frame is not None else []
        if not view.has_context and view.unencoded is None:  # an ask's own view, or a dropped context
            view.unencoded = feed.reader.latest()  # encode the newest frame if something is to be answered
        own_pressed = [question for question in pressed if question in view.schedule.questions]
        due += [question for question in own_pressed if question not in due]
        rechecks = self._rechecks(view, due) if frame is not None else []
        own_asks = [request for request in asks if request.region == view.region]
        turn = decide(
            changed=view.unencoded is not None,
            have_context=view.has_context,
            due=len(due),
            pending_asks=len(own_asks),
            rechecks=len(rechecks),
            forced=bool(own_pressed),
        )
        return ViewTurn(feed, view, turn, due + rechecks, own_asks, own_pressed)

    def _rechecks(self, view: View, due: list[Question]) -> list[Question]:
        """The view's enabled questions not due whose change is pending: each new frame answers them again until
        it settles."""
        return [q for q in view.schedule.enabled if q not in due and self._stable[q.id].pending is not None]

    def _take_turn(self, turn: ViewTurn) -> None:
        """Do what `decide` said in one view (its encode is done): asks first (someone waits for them), then the
        due standing questions. The answers of pressed questions (a check-now) are published even when their
        value is unchanged."""
        if turn.turn is Turn.NO_FRAME:
            for request in turn.asks:
                self._refuse_ask(request, AskRefusal(Refusal.NO_FRAME, "no camera frame yet"))
            if turn.pressed:
                log.info("check now: no camera frame yet")
            return
        if turn.turn is not Turn.SKIP:
            self._contexts.used(turn.view)
            self._answer_asks(turn.view.scene, turn.asks)
            self._answer_standing(turn, turn.due, forced=turn.pressed)

    def _encode(self, turns: list[ViewTurn]) -> None:
        """Encode the views `turns` need, of every camera, as one batch: each the view of the frame its gate found
        changed, else of the camera's newest frame (a re-check, or a check-now between frames). A frame the gate
        found unchanged, or a scene encoded again after its context was dropped, is no scene change, but an
        encode all the same."""
        if not turns:
            return
        frames = [turn.view.unencoded or turn.feed.reader.latest() for turn in turns]
        started = time.time()
        contexts = self._engine.encode_views([turn.view.cut(chosen) for turn, chosen in zip(turns, frames)])
        for turn, chosen, context in zip(turns, frames, contexts):
            scene_change = chosen is turn.view.unencoded and (turn.view.scene is None or turn.view.has_context)
            self.metrics.encode(turn.feed.id, scene_change, waited_s=started - chosen.ts)
            turn.view.encoded(chosen, context)
        timings = contexts[0].timings
        self.metrics.observe_stages({"preprocess": timings.preprocess_ms / 1000, "vision": timings.vision_ms / 1000})

    def _answer_standing(self, turn: ViewTurn, due: list[Question], forced: list[Question]) -> None:
        """Publish an answer to each due question, stamped with the newest frame known to show the view's scene.

        A question is answered on the scene's context once (`scene_changed`: its previous answer, if any, was
        on another frame), then that answer is reused while the gate finds the scene unchanged. Only an answer
        computed on the context counts toward the question's stable state: a reused one is no new evidence. The
        answers of `forced` questions (a check-now) are published even when unchanged. The image of a state
        that changed goes out before the state (`_offer_evidence`).
        """
        view = turn.view
        scene = view.scene
        fresh = [q for q in due if q.id not in scene.answers]
        if fresh:
            for question, answer in zip(fresh, self._ask_engine(scene.context, fresh)):
                scene.answers[question.id] = self._settled(self._message(question, answer, scene), scene.seq)
                self._offer_evidence(question, scene)
            self._publish_evidence()
        now = time.monotonic()
        for question in due:
            message = dataclasses.replace(
                scene.answers[question.id], scene_changed=question in fresh, **answer_times(scene.frame_ts)
            )
            self._link.publish_answer(message, force=question in forced)
            self.board.answer(message)
            self.metrics.answered(turn.feed.id, message.latency_ms / 1000)
            view.schedule.mark_answered(question.id, now)

    def _settled(self, message: AnswerMessage, frame: int) -> AnswerMessage:
        """`message`, an answer computed on frame number `frame`, counted by its question's stable state and
        carrying that state as `value` and `state`, the answer itself as `latest_value` (with `raw`, `confidence`)."""
        stable = self._stable[message.question_id]
        stable.observe(message.value, message.state, message.confidence, frame)
        return dataclasses.replace(
            message, value=stable.value, state=stable.state, latest_value=message.value, pending=stable.pending
        )

    def _offer_evidence(self, question: Question, scene: Scene) -> None:
        """Hold the image of the scene (the question's view) when the question's answer just computed on it agrees
        with the published value and that value has no image yet (its first value, or a change)."""
        message = scene.answers[question.id]
        if self.config.evidence.enabled and self._evidence_log.shows_new_value(
            question.id, published=message.value, latest=message.latest_value
        ):
            self._evidence_pacer.offer(question.id, scene.image)

    def _publish_evidence(self) -> None:
        """Publish the held images whose question's `evidence.min_interval_s` is over."""
        for question_id, view in self._evidence_pacer.due(time.monotonic()):
            jpeg = evidence_jpeg(view, self.config.evidence)
            if jpeg is not None:
                self._link.publish_evidence(question_id, jpeg)
                self.board.evidence(question_id, jpeg)

    def _ask_evidence(self, request: AskRequest, scene: Scene) -> str | None:
        """Publish the image an ask was answered on, if it asked for one and evidence is on; return its topic."""
        if not (request.evidence and self.config.evidence.enabled):
            return None
        jpeg = evidence_jpeg(scene.image, self.config.evidence)
        return None if jpeg is None else self._reply_channel(request).publish_ask_evidence(request, jpeg)

    def _ask_engine(self, context: FrameContext, questions: list[Question]) -> list[Answer]:
        default = self.config.model.max_new_tokens
        started = time.perf_counter()
        answers = self._engine.answer(context, [engine_prompt(q, default) for q in questions])
        self.metrics.inferences.inc()
        timings = answers[0].timings
        self.metrics.observe_stages(
            {
                "prefill": timings.question_prefill_ms / 1000,
                "decode": timings.decode_ms / 1000,
                "total": time.perf_counter() - started,
            }
        )
        return answers

    def _message(self, question: Question, answer: Answer, scene: Scene) -> AnswerMessage:
        """The message for an answer just computed on `scene`."""
        typed = parse_answer(question, answer.text)
        if not typed.ok:
            log.info(
                "question %s: could not parse %r as %s; publishing unknown", question.id, answer.text, question.type
            )
        return AnswerMessage(
            question_id=question.id,
            question=question.question,
            type=question.type,
            value=typed.value,
            raw=answer.text,
            state=state_string(question, typed),
            model=self._engine.name,
            scene_changed=True,
            confidence=answer.confidence,
            **answer_times(scene.frame_ts),
        )

    # -- controls ----------------------------------------------------------------------------------------

    def _enqueue_command(self, command: Command) -> None:
        """Runs on the MQTT network thread: only enqueue (the link already checked and rate-limited it)."""
        try:
            self._commands.put_nowait(command)
        except queue.Full:
            log.debug("dropping a control command: %d are waiting already", COMMAND_QUEUE_LIMIT)

    def _apply_commands(self) -> list[Question]:
        """Apply the waiting switch flips, and return the enabled questions a press asks to answer now.

        Flips are applied in order; each question whose state changed is then saved (once for all) and
        published once, so a burst of flips costs one file write and one message per question.
        """
        commands = [self._commands.get_nowait() for _ in range(self._commands.qsize())]
        before = self._controls.states
        for command in commands:
            if command.kind != CHECK:
                self._controls.set(command.question_id, command.enabled)
        changed = {key: enabled for key, enabled in self._controls.states.items() if before[key] != enabled}
        if changed:
            self._controls.save()
        for question_id, enabled in changed.items():
            log.info("question %s %s by its switch", question_id, "enabled" if enabled else "disabled")
            self._view_of[question_id].schedule.set_enabled(question_id, enabled)
            self._link.publish_enabled(question_id, enabled)
            self.board.enabled(question_id, enabled)
        pressed = {command.question_id for command in commands if command.kind == CHECK}
        enabled = [question for view in self._views for question in view.schedule.enabled]
        return [question for question in enabled if None in pressed or question.id in pressed]

    # -- ad hoc questions --------------------------------------------------------------------------------

    def _enqueue_ask(self, request: AskRequest) -> None:
        """Runs on the MQTT network thread: only enqueue (or refuse when full)."""
        try:
            self._asks.put_nowait(request)
        except queue.Full:
            self._refuse_ask(request, AskRefusal(Refusal.BUSY, "busy: too many questions waiting, try again later"))

    def _take_asks(self, count: int) -> list[AskRequest]:
        """The `count` oldest waiting ad hoc questions, off the queue (only this thread takes from it)."""
        return [self._asks.get_nowait() for _ in range(count)]

    def _answer_asks(self, scene: Scene, asks: list[AskRequest]) -> None:
        for request in asks:
            try:
                self._answer_ask(request, scene)
            except Exception:  # one odd request must not stop the loop that answers the standing questions
                log.exception("could not answer the ad hoc question %r", request.question[:80])
                self._refuse_ask(
                    request, AskRefusal(Refusal.FAILED, "internal error: the agent could not answer this question")
                )

    def _answer_ask(self, request: AskRequest, scene: Scene) -> None:
        """Answer on the scene of the ask's view (the loop encoded the newest frame first if it changed there)."""
        tokens = len(self._engine.tokenizer.encode(request.question))
        if tokens > ASK_QUESTION_TOKEN_LIMIT:
            self._refuse_ask(
                request,
                AskRefusal(
                    Refusal.TOO_LONG, f"'question' is {tokens} tokens long, more than {ASK_QUESTION_TOKEN_LIMIT}"
                ),
            )
            return
        try:
            question = ad_hoc_question(request)
        except UserError as error:
            self._refuse_ask(request, AskRefusal(Refusal.INVALID, str(error)))
            return
        too_long = prompt_too_long(self._engine, question)
        if too_long is not None:
            self._refuse_ask(request, AskRefusal(Refusal.TOO_LONG, str(too_long)))
            return
        limit = request.max_new_tokens or self.config.model.max_new_tokens
        answer = self._engine.answer(scene.context, [engine_prompt(question, limit)])[0]
        typed = parse_answer(question, answer.text)
        self.metrics.ask_requests.labels(result=ANSWERED).inc()
        self._reply_channel(request).reply(
            request,
            AskReply(
                question=request.question,
                answer=answer.text,
                type=question.type,
                value=typed.value,
                confidence=answer.confidence,
                **answer_times(scene.frame_ts),
                model=self._engine.name,
                evidence_topic=self._ask_evidence(request, scene),
            ),
        )

    def _refuse_ask(self, request: AskRequest, refusal: AskRefusal) -> None:
        """Count the refusal by its reason and tell the requester why."""
        self._count_refusal(refusal.reason)
        self._reply_channel(request).reply(request, refusal)

    def _reply_channel(self, request: AskRequest) -> AgentLink | PageReply:
        """Where an ask's answer and image go: back to the status page that asked, else over MQTT."""
        return request.reply if isinstance(request.reply, PageReply) else self._link

    def _count_refusal(self, reason: Refusal) -> None:
        """Count a refused ask, the service's or the link's (then on the MQTT network thread)."""
        self.metrics.ask_requests.labels(result=reason.value).inc()

    # -- health ------------------------------------------------------------------------------------------

    def _on_camera_status(self, camera_id: str, online: bool) -> None:
        """Runs on the camera's reader thread."""
        self.metrics.camera_status(camera_id, online)
        self.board.camera_status(camera_id, online)
        if self._link is not None:
            self._link.publish_camera(online, None if not self.config.several_cameras else camera_id)
        if online:
            log.info("%s online", self._camera_name(camera_id))
        else:
            log.warning("%s offline", self._camera_name(camera_id))

    def _camera_name(self, camera_id: str) -> str:
        """The camera as log lines name it: `camera`, or `camera <id>` with `cameras:`."""
        return f"camera {camera_id}" if self.config.several_cameras else "camera"

    def _camera_label(self, feed: CameraFeed) -> str | None:
        """How topics and Home Assistant name the camera: by its id, or not at all in the single form."""
        return feed.id if self.config.several_cameras else None

    def _report_capture_health(self, frames: dict[str, Frame | None]) -> None:
        """Capture is healthy while frames arrive, or while a camera is (re)opening an offline source."""
        if any(frame is not None for frame in frames.values()):
            self.watchdog.progress("capture")
        elif not all(feed.reader.online for feed in self._feeds):
            self.watchdog.idle("capture")

    def _update_link_metrics(self) -> None:
        self.metrics.mqtt_connected.set(1 if self._link.connected else 0)
        self.metrics.mqtt_queue_depth.set(self._link.queued)
        self.metrics.mqtt_dropped.set(self._link.dropped)


def engine_prompt(question: Question, default_max_new_tokens: int) -> Prompt:
    """How the engine should answer a question, as its kind's constraint says (pick an option, digits, free)."""
    constraint = kind_of(question).constraint
    return Prompt(
        build_prompt(question),
        max_new_tokens=question.max_new_tokens or default_max_new_tokens,
        options=constraint.options_for(question),
        digits=constraint.digits,
    )


def answer_times(frame_ts: float) -> dict[str, float]:
    """`frame_ts`, `answered_ts` (now) and `latency_ms` between them: the times every answer carries.

    An answer reused for a newer frame of the same scene is stamped again, so `frame_ts <= answered_ts`
    holds for every answer and its latency is never measured from another frame than its `frame_ts`.
    """
    answered = time.time()
    return {"frame_ts": frame_ts, "answered_ts": answered, "latency_ms": round((answered - frame_ts) * 1000.0, 1)}


def prompt_too_long(engine: Engine, question: Question) -> InvalidValue | None:
    """The question's prompt or one of its options over `MAX_PROMPT_TOKENS` / `MAX_OPTION_TOKENS`, or None.

    The whole prompt is counted first: one tokenizer call refuses a huge one before its options are spelled.
    """
    prompt = build_prompt(question)
    tokens = engine.prompt_tokens(prompt)
    if tokens > MAX_PROMPT_TOKENS:
        key, parts = ("options", "question, options") if question.options else ("question", "question")
        return InvalidValue(
            key, f"the prompt ({parts} and instruction) is {tokens} tokens long, more than {MAX_PROMPT_TOKENS}"
        )
    for index, option in enumerate(question.options):
        tokens = engine.option_tokens(prompt, option)
        if tokens > MAX_OPTION_TOKENS:
            return InvalidValue(f"options[{index}]", f"is {tokens} tokens long, more than {MAX_OPTION_TOKENS}")
    return None


def check_prompt_lengths(engine: Engine, config: Config) -> None:
    """Refuse, as one line, a standing question whose prompt the model's tokenizer makes too long.

    The config loader checks option counts and characters; tokens need the model, so this runs once it
    is loaded, before the agent connects and announces anything.
    """
    for number, camera in enumerate(config.all_cameras):
        for index, question in enumerate(camera.questions):
            problem = prompt_too_long(engine, question)
            if problem is not None:
                where = f"cameras[{number}].questions[{index}]" if config.several_cameras else f"questions[{index}]"
                raise problem.under(where)


def entity_spec(question: Question, camera: str | None = None) -> EntitySpec:
    """The question as Home Assistant sees it; `camera` names the device it is on (None: the agent's)."""
    return EntitySpec(
        question_id=question.id,
        name=question.question,
        type=question.type,
        device_class=question.device_class,
        options=tuple(question.options or ()),
        camera=camera,
    )


class ContextBudget:
    """Keeps the views' contexts within `limit` bytes (0: no limit), dropping the least recently used view's first.

    A context is the engine's memory of one encoded view (image features and prompt prefix in the paged
    cache pool): the only memory a camera or region adds to the agent. A dropped view keeps its scene and
    answers and is encoded again when something must be answered on it. Only the standing `views` count: the
    view of an ask's own region lives for one turn."""

    def __init__(self, limit: int, views: list[View]) -> None:
        self._limit = limit  # bytes
        self._standing = set(views)
        self._used: dict[View, None] = {}  # the views with a context, least recently used first

    def used(self, view: View) -> None:
        """The view's context was just encoded or answered on."""
        if view in self._standing:
            self._used.pop(view, None)
            self._used[view] = None

    def trim(self) -> None:
        """Drop the least recently used contexts beyond the limit (after a turn: none is dropped mid-turn)."""
        self._used = {view: None for view in self._used if view.has_context}
        if not self._limit:
            return
        held = sum(view.scene.context.nbytes for view in self._used)
        while held > self._limit:
            oldest = next(iter(self._used))
            del self._used[oldest]
            held -= oldest.scene.context.nbytes
            oldest.drop_context()


def ad_hoc_question(request: AskRequest) -> Question:
    """An ask request as a question: typed when the request names a type, free text otherwise.

    `Question` checks the request as it checks a config question (its type against `questions.KINDS`, its
    options, its text) and raises `InvalidValue`, a one-line `UserError`.
    """
    return Question(id="ask", question=request.question, type=request.type or "text", options=tuple(request.options))


def run_agent(config: Config) -> int:
    """`edge-agent run`: start the agent and run it until SIGTERM or SIGINT.

    A stop while the model loads ends the process at once (status 0) instead of waiting for the load.
    """
    agent = Agent(config)
    handle_signals(agent)
    try:
        started = agent.start()
        if started:
            agent.run()
    finally:
        agent.shutdown()
    if not started:
        exit_leaving_the_load_behind()
    return 0


def handle_signals(agent: Agent) -> None:
    """SIGTERM and SIGINT stop the agent; SIGHUP, which would kill it silently, is logged and changes nothing.

    The unit defines no `ExecReload=`, so systemd never sends SIGHUP; one sent by hand (or by a closed
    terminal) must not take the camera's answers down. Changes to the config need a restart.
    """

    def request_stop(signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        agent.stop()

    def refuse_reload(_signum, _frame):
        log.warning("received SIGHUP: reloading is not supported, restart the service to apply changes")

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, refuse_reload)


def exit_leaving_the_load_behind() -> typing.NoReturn:
    """End the process now, with status 0, while the abandoned model load still runs on its thread.

    A normal exit would wait for that thread (concurrent.futures joins its workers at exit), that is for
    the whole compile, or tear the interpreter down under the compile's feet; `os._exit` does neither.
    """
    logging.shutdown()
    os._exit(0)
