"""The one validated schema behind config.yaml: frozen dataclasses, each field documented and checked.

Validation is generic: `parse_config` walks the dataclass type hints (str, int, float, bool, Optional,
Literal, unions of scalars, tuples and nested dataclasses), so adding a setting is one line:

    fps: float = setting(1.0, "Maximum frames sampled per second.", check=positive)

Every problem becomes one `UserError` line naming the dotted key path and the reason, e.g.
`config.yaml: questions[2].type: must be one of yes_no, choice, number, text, got 'multi'`.

The layers take their section as it is (`MqttSettings`, `CameraSettings`, `SceneGateSettings`), so this
module imports only the standard library and pyyaml. The same fields and checks give `config_schema()`,
the JSON Schema printed by `edge-agent config schema`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import socket
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional, Union

import yaml

from edge_agent import device_classes
from edge_agent.errors import UserError
from edge_agent.questions import KINDS

log = logging.getLogger(__name__)

REQUIRED: Any = dataclasses.MISSING
"""Default of a setting the user must give."""

Check = Callable[[Any], Optional[str]]
"""A rule on one value: returns the reason it is invalid, or None when it is fine."""


class InvalidValue(UserError):
    """A setting that breaks a rule; `key` is relative to the section that noticed (e.g. `options`)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason

    def under(self, path: str) -> InvalidValue:
        """The same problem, with `path` (the section's own key path) in front of the key."""
        return InvalidValue(_join(path, self.key), self.reason)


def setting(default: Any, doc: str, *, check: Check | None = None) -> Any:
    """A documented field; `check` runs on every non-null value when the section is built."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


def setting_from(factory: Callable[[], Any], doc: str, *, check: Check | None = None) -> Any:
    """A documented field whose default is computed (a nested section, the host name)."""
    return dataclasses.field(default_factory=factory, metadata={"doc": doc, "check": check})


# Rules on single values --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule on one value (`test` returns the reason it is broken, or None) with the JSON Schema keywords that
    say the same to an editor; a rule JSON Schema cannot express states nothing ({})."""

    test: Check
    json_schema: dict = dataclasses.field(default_factory=dict)

    def __call__(self, value: Any) -> str | None:
        return self.test(value)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A rule that a number lies within bounds, stated once for the check and for JSON Schema.

    `reason` may name `{value}`, `{minimum}` and `{maximum}`; `above` is an exclusive minimum.
    """

    reason: str
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None

    def __call__(self, value: float) -> str | None:
        inside = (
            (self.minimum is None or value >= self.minimum)
            and (self.above is None or value > self.above)
            and (self.maximum is None or value <= self.maximum)
        )
        return None if inside else self.reason.format(value=value, minimum=self.minimum, maximum=self.maximum)

    @property
    def json_schema(self) -> dict:
        keywords = {"minimum": self.minimum, "exclusiveMinimum": self.above, "maximum": self.maximum}
        return {keyword: bound for keyword, bound in keywords.items() if bound is not None}


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A rule that the whole (ASCII) string matches `pattern`."""

    pattern: str
    reason: str

    def __call__(self, value: str) -> str | None:
        return None if re.fullmatch(self.pattern, value, re.ASCII) else self.reason

    @property
    def json_schema(self) -> dict:
        return {"pattern": f"^(?:{self.pattern})$"}


positive = Bounds("must be a positive number", above=0)
zero_or_more = Bounds("must be 0 or a positive number", minimum=0)
fraction = Bounds("must be between {minimum} and {maximum}", minimum=0, maximum=1)
port_number = Bounds("must be a port number between {minimum} and {maximum}", minimum=1, maximum=65535)
not_blank = Rule(lambda value: None if value.strip() else "must not be empty", {"pattern": r"\S"})


def at_most(limit: int, unit: str, why: str) -> Bounds:
    """A rule that a positive number is at most `limit`; the reason says `why`."""
    return Bounds(f"must be between 1 and {{maximum}} {unit} ({why}), got {{value}}", above=0, maximum=limit)


MAX_WAIT_S = 7 * 24 * 3600
"""Longest camera timeout or backoff: OpenCV takes timeouts as 32-bit milliseconds (24.8 days), Python's
waits overflow beyond 292 years, and a week is already far beyond any sensible camera setting."""

wait_seconds = Bounds("must be a positive number of seconds up to {maximum} (a week)", above=0, maximum=MAX_WAIT_S)


def json_schema_of(check: Check | None) -> dict:
    """The JSON Schema keywords a check states ({} for a plain function)."""
    return getattr(check, "json_schema", {})


def all_of(*checks: Check) -> Rule:
    """A rule that each of `checks` holds; the reason is the first broken one's."""
    stated = [json_schema_of(check) for check in checks if json_schema_of(check)]
    return Rule(
        lambda value: next(filter(None, (check(value) for check in checks)), None), {"allOf": stated} if stated else {}
    )


def each(check: Check) -> Rule:
    """A rule on every item of a list; the problem names the first item that breaks it (`options[1]`)."""

    def check_items(items: tuple) -> None:
        for index, item in enumerate(items):
            reason = check(item)
            if reason:
                raise InvalidValue(f"[{index}]", reason)

    return Rule(check_items, {"items": json_schema_of(check)} if json_schema_of(check) else {})


def refused_by_brokers(character: str) -> bool:
    """Control characters (C0, DEL, C1), surrogates and Unicode non-characters.

    MQTT 5 (1.5.4) lets a server drop a client whose strings hold them, and mosquitto does: a client id or
    user name with one is refused at every connect, a topic with one ends the connection at every publish.
    """
    code = ord(character)
    return (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xDFFF
        or 0xFDD0 <= code <= 0xFDEF
        or code & 0xFFFE == 0xFFFE
    )


def mqtt_text(value: str) -> str | None:
    refused = next((character for character in value if refused_by_brokers(character)), None)
    if refused is None:
        return None
    return f"must not contain U+{ord(refused):04X} (MQTT brokers refuse control characters and non-characters)"


IMAGE_PLACEHOLDER = "<image>"
"""Where LLaVA chat templates put the image; the tokenizer reads this text as the image token anywhere."""


no_image_placeholder = Rule(
    lambda value: (
        None
        if IMAGE_PLACEHOLDER not in value
        else f"must not contain {IMAGE_PLACEHOLDER!r}: the model reads it as a second place for the image"
    ),
    {"not": {"pattern": re.escape(IMAGE_PLACEHOLDER)}},
)
Region = tuple[float, float, float, float]
"""(x0, y0, x1, y1): left, top, right, bottom as fractions of the frame's width and height."""


def region_problem(region: tuple) -> str | None:
    """Why `region` is not a rectangle inside the frame, or None when it is one."""
    if len(region) != 4:
        return f"must be 4 numbers [x0, y0, x1, y1], got {len(region)}"
    if any(not 0.0 <= edge <= 1.0 for edge in region):
        return "must lie inside the frame: every number between 0 and 1 (fractions of the width and height)"
    x0, y0, x1, y1 = region
    if x1 <= x0 or y1 <= y0:
        return "must not be empty: x0 < x1 and y0 < y1 ([left, top, right, bottom])"
    return None


region_rule = Rule(
    region_problem,
    {"minItems": 4, "maxItems": 4, "items": {"minimum": 0, "maximum": 1}},
)
topic_safe = Pattern(r"[A-Za-z0-9_-]+", "must contain only letters, digits, '_' and '-'")
topic_levels = Pattern(
    r"[^/#+\s]+(/[^/#+\s]+)*",
    "must be MQTT topic levels separated by '/', without wildcards, spaces or empty levels",
)
_DEVICE = r"[A-Z]+(\.[0-9]+)?"
device_name = Pattern(
    rf"{_DEVICE}(:{_DEVICE}(,{_DEVICE})*)?",
    "must be an OpenVINO device name such as CPU, GPU, GPU.1, NPU or AUTO:GPU,CPU",
)
device_index = Bounds("must be a V4L2 device index (0 or more) or a path/URL", minimum=0)
camera_source = Rule(
    lambda value: device_index(value) if isinstance(value, int) else not_blank(value),
    {**device_index.json_schema, **not_blank.json_schema},  # minimum binds numbers only, pattern strings only
)


def split_host_port(text: str) -> tuple[str, int] | None:
    """`host:port` or `[ipv6]:port` -> (host, port), port 0 meaning any free port; None if malformed."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or "[" in host or "]" in host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        return None
    return host, int(port)


def listen_address(value: str) -> str | None:
    if not value or split_host_port(value):
        return None
    return "must be host:port (e.g. 127.0.0.1:9464), or empty to disable"


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1); a host name is taken as not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Secrets -----------------------------------------------------------------------------------------


def read_secret(path: str, key: str) -> str:
    """The stripped content of a secret file; errors name `key` and the file, never the content.

    A relative path is looked up in `$CREDENTIALS_DIRECTORY` when systemd provides one
    (`LoadCredential=`), otherwise relative to the working directory.
    """
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    resolved = Path(credentials, path) if credentials and not os.path.isabs(path) else Path(path)
    try:
        secret = resolved.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise UserError(f"{key}: cannot read {resolved}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{key}: {resolved} is not UTF-8 text") from None
    if not secret:
        raise UserError(f"{key}: {resolved} is empty")
    return secret


def usable_cache_dir(path: str | None, key: str = "model.cache_dir") -> str | None:
    """`path` made ready for OpenVINO's compiled-model cache, or None to load the model without one.

    OpenVINO silently caches nothing in a directory it cannot write (read-only or full file system), so the
    directory is tried first (`writable_dir`); then the model loads (slowly, compiling everything) without one.
    """
    return writable_dir(path, key, "loading the model without a compiled-model cache")


def usable_state_dir(path: str | None, key: str = "state_dir") -> str | None:
    """`path` made ready to keep the agent's state (which questions are enabled), or None to keep nothing:
    the controls then hold until the agent stops."""
    return writable_dir(path, key, "enabled questions are not kept across restarts")


def writable_dir(path: str | None, key: str, otherwise: str) -> str | None:
    """`path`, created if needed, once one byte was written there; else None (and one warning that says
    `otherwise` happens). A path that is a file, or lies under one, is a mistake: `UserError` naming `key`.
    """
    if path is None:
        return None
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{key}: {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, buffering=0) as probe:
            probe.write(b"\0")
    except NotADirectoryError:
        raise UserError(f"{key}: cannot create {directory}: a parent of it is a file") from None
    except OSError as error:
        log.warning("%s: %s is not writable (%s); %s", key, directory, error.strerror, otherwise)
        return None
    return str(directory)


def default_state_dir() -> str:
    """`$STATE_DIRECTORY` when systemd sets it (`StateDirectory=`; the first of several), else
    `$XDG_STATE_HOME/edge-agent`, else `~/.local/state/edge-agent`."""
    systemd_state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd_state:
        return systemd_state
    return str(Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state", "edge-agent"))


# The schema --------------------------------------------------------------------------------------


class Settings:
    """Base of every section: checks each field when built, then the section's cross-field rules."""

    rules_together: ClassVar[tuple] = ()
    """Rules on several fields that JSON Schema can state too: each returns the reason the section breaks it
    (or None) and names the `key` it blames; its `json_schema` joins the section's schema."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check, value = field.metadata["check"], getattr(self, field.name)
            try:
                reason = check(value) if check and value is not None else None
            except InvalidValue as error:  # a rule on list items names the item
                raise error.under(field.name) from None
            if reason:
                raise InvalidValue(field.name, reason)
        for rule in self.rules_together:
            reason = rule(self)
            if reason:
                raise InvalidValue(rule.key, reason)
        self.check_together()

    def check_together(self) -> None:
        """Rules that involve several fields; raise `InvalidValue` naming the offending key."""


MAX_OPTIONS = 20
"""Most options a choice question may list. Every option is listed in the prompt and each of its spellings
is scored, so the prompt and the scoring grow with them; Home Assistant shows them as one select list."""
MAX_OPTION_CHARS = 80
"""Longest option in characters: an answer, not a paragraph. Its tokens are bounded too, once the model's
tokenizer is known (`service.MAX_OPTION_TOKENS`)."""


class QuestionKindRule:
    """A rule that a value names a row of `questions.KINDS`; the table is read when checked and when the JSON
    Schema is made, so every row counts (a new kind is one row)."""

    def __call__(self, value: str) -> str | None:
        if value in KINDS:
            return None
        close = difflib.get_close_matches(value, list(KINDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"must be one of {', '.join(KINDS)}, got {_show(value)}{hint}"

    @property
    def json_schema(self) -> dict:
        return {"enum": list(KINDS)}


question_kind = QuestionKindRule()


class DeviceClassRule:
    """A rule that a question's `device_class` is one Home Assistant knows for the component of the question's
    entity and that fits what the entity shows (the kind's `Component.device_classes`, from the table in
    `edge_agent.device_classes`). Home Assistant refuses an entity with a class its component does not know,
    and says so only in its own log. Its JSON Schema is one `if type then device_class` per kind."""

    key = "device_class"

    def __call__(self, question: Question) -> str | None:
        value = question.device_class
        component = KINDS[question.type].component
        if value is None or value in component.device_classes:
            return None
        if component.enum:
            return f"a {question.type} question is always an enum sensor with its options; remove device_class"
        if not component.device_classes:
            return (
                f"a {question.type} question's {component.name} shows free text, which no device class fits; "
                "remove device_class"
            )
        return self._unknown_or_unfit(value, question.type, component.name, sorted(component.device_classes))

    @staticmethod
    def _unknown_or_unfit(value: str, kind: str, component: str, fitting: list[str]) -> str:
        if value in device_classes.BY_COMPONENT[component]:
            reason = f"{_show(value)} does not fit a {kind} question: its {component} has no unit of measurement"
        else:
            entity = f"a Home Assistant {component} (the entity of a {kind} question)"
            reason = f"{_show(value)} is not a device class of {entity}"
        close = difflib.get_close_matches(value, fitting, n=3)
        if close:
            return f"{reason}; did you mean {alternatives([repr(name) for name in close])}?"
        if len(fitting) <= MAX_CLASSES_LISTED:
            return f"{reason}; a {kind} question takes {alternatives(fitting)}"
        return reason

    @property
    def json_schema(self) -> dict:
        return {
            "allOf": [
                {
                    "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                    "then": {"properties": {"device_class": {"enum": [*sorted(kind.component.device_classes), None]}}},
                }
                for name, kind in KINDS.items()
            ]
        }


MAX_CLASSES_LISTED = 5
"""An error lists the device classes a kind takes when there are at most this many (else only close ones)."""
question_device_class = DeviceClassRule()


def kinds_with_options() -> str:
    """The kinds whose questions list options to choose among ("choice")."""
    return alternatives([kind.name for kind in KINDS.values() if kind.constraint.question_options])


def kinds_with_confidence() -> str:
    """The kinds whose answers pick an option and so have a confidence ("yes_no or choice")."""
    return alternatives([kind.name for kind in KINDS.values() if kind.constraint.picks_option])


def alternatives(names: list[str]) -> str:
    """`a, b or c`, as a sentence lists alternatives."""
    *rest, last = names
    return f"{', '.join(rest)} or {last}" if rest else last


@dataclasses.dataclass(frozen=True, kw_only=True)
class Question(Settings):
    """A standing question asked about the camera image, answered with a typed value."""

    id: str = setting(
        REQUIRED,
        "Unique name used in MQTT topics and Home Assistant ids (letters, digits, '_', '-').",
        check=topic_safe,
    )
    question: str = setting(REQUIRED, "The question, in plain language.", check=all_of(not_blank, no_image_placeholder))
    type: str = setting(
        REQUIRED,
        f"Answer type ({alternatives(list(KINDS))}): decides prompt, parsing and entity.",
        check=question_kind,
    )
    options: tuple[str, ...] = setting(
        (),
        "The allowed answers of a choice question (at least 2, unique); only for type choice.",
        check=each(no_image_placeholder),
    )
    every: float = setting(
        30.0,
        "Seconds between answers (interval), or the minimum gap between answers (change).",
        check=positive,
    )
    trigger: Literal["interval", "change"] = setting(
        "interval",
        "interval: ask every `every` seconds; change: only after the scene changed, at most once per `every`.",
    )
    max_new_tokens: Optional[int] = setting(
        None, "Answer length limit in tokens; null = model.max_new_tokens.", check=positive
    )
    device_class: Optional[str] = setting(
        None, "Home Assistant device_class of the entity (e.g. door, occupancy); null = none."
    )
    instruction: Optional[str] = setting(
        None,
        'Replaces the type\'s answer-format instruction after the question; "" = none.',
        check=no_image_placeholder,
    )
    confirm: Optional[int] = setting(
        None,
        "Answers from distinct frames that must agree to change the state; null = question_defaults.confirm.",
        check=positive,
    )
    min_confidence: Optional[float] = setting(
        None,
        "Answers below this confidence leave the state as it is (yes_no and choice only);"
        " null = question_defaults.min_confidence.",
        check=fraction,
    )
    region: Optional[tuple[float, ...]] = setting(
        None,
        "The part of the frame the question looks at: [x0, y0, x1, y1], left, top, right, bottom as fractions"
        " of the frame (0..1); questions with the same region share one encoded view; null = the whole frame.",
        check=region_rule,
    )

    rules_together: ClassVar[tuple] = (question_device_class,)

    def check_together(self) -> None:
        if self.min_confidence is not None and not KINDS[self.type].constraint.picks_option:
            raise InvalidValue(
                "min_confidence",
                f"only allowed when type is {kinds_with_confidence()} (type is {self.type}): "
                "other answers have no confidence",
            )
        if not KINDS[self.type].constraint.question_options:
            if self.options:
                raise InvalidValue("options", f"only allowed when type is {kinds_with_options()} (type is {self.type})")
            return
        if len(self.options) < 2:
            raise InvalidValue("options", f"must list at least 2 options when type is {self.type}")
        if len(self.options) > MAX_OPTIONS:
            raise InvalidValue("options", f"lists {len(self.options)} options, more than {MAX_OPTIONS}")
        folded = [option.strip().casefold() for option in self.options]
        if "" in folded:
            raise InvalidValue(f"options[{folded.index('')}]", "must not be empty")
        too_long = next((index for index, option in enumerate(self.options) if len(option) > MAX_OPTION_CHARS), None)
        if too_long is not None:
            raise InvalidValue(
                f"options[{too_long}]",
                f"is {len(self.options[too_long])} characters long, more than {MAX_OPTION_CHARS}",
            )
        duplicate = first_duplicate(folded)
        if duplicate is not None:
            raise InvalidValue(f"options[{duplicate}]", f"duplicate option {self.options[duplicate]!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuestionDefaults(Settings):
    """How steady the published states are: the values of `confirm` and `min_confidence` for every question that
    does not set its own (`edge_agent.stable` says exactly what they do)."""

    confirm: int = setting(
        1,
        "Answers from distinct frames that must agree before a question's state changes; 1 = change at once.",
        check=positive,
    )
    min_confidence: float = setting(
        0.0,
        "A yes_no or choice answer below this confidence (0..1) leaves the state as it is; 0 = every answer counts.",
        check=fraction,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CameraSettings(Settings):
    """Where frames come from and how a failing source is retried."""

    source: str | int = setting(
        0,
        "V4L2 index, /dev/videoN, rtsp/http(s) URL, video file, image file or directory of images.",
        check=camera_source,
    )
    loop: bool = setting(False, "Restart a video file or image directory at its end instead of stopping.")
    fps: float = setting(1.0, "Maximum frames sampled per second.", check=positive)
    open_timeout_s: float = setting(10.0, "Seconds to wait for the source to open.", check=wait_seconds)
    read_timeout_s: float = setting(5.0, "Seconds to wait for one frame before a read fails.", check=wait_seconds)
    stale_after_s: float = setting(
        15.0,
        "Seconds without a new frame before the source is reopened; longer than one frame interval (1/fps).",
        check=wait_seconds,
    )
    backoff_initial_s: float = setting(
        1.0, "First wait in seconds before reopening a failed source.", check=wait_seconds
    )
    backoff_max_s: float = setting(
        30.0, "Longest wait in seconds between reopen attempts (doubling).", check=wait_seconds
    )

    def check_together(self) -> None:
        if self.backoff_initial_s > self.backoff_max_s:
            raise InvalidValue("backoff_initial_s", f"must not exceed backoff_max_s ({self.backoff_max_s})")
        if self.stale_after_s <= 1.0 / self.fps:  # else every pause between two samples would count as stale
            raise InvalidValue(
                "stale_after_s",
                f"must be longer than one frame interval at camera.fps "
                f"({1.0 / self.fps:g} s), got {self.stale_after_s}",
            )

    @property
    def source_text(self) -> str:
        """The source as the capture layer reads it: a V4L2 index as its digits, surrounding spaces removed."""
        return str(self.source).strip()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSettings(Settings):
    """The exported vision-language model and the devices it runs on."""

    path: str = setting(
        REQUIRED, "Directory of the exported OpenVINO model (edge-agent model export).", check=not_blank
    )
    device: str = setting(
        "CPU", "OpenVINO device for both submodels: CPU, GPU, GPU.1, NPU, AUTO, ...", check=device_name
    )
    vision_device: Optional[str] = setting(
        None, "Device for the vision encoder only; null = device.", check=device_name
    )
    language_device: Optional[str] = setting(
        None, "Device for the language model only; null = device.", check=device_name
    )
    cache_dir: Optional[str] = setting(
        None,
        "Directory where OpenVINO caches compiled models for faster starts; null = no cache.",
        check=not_blank,
    )
    max_new_tokens: int = setting(16, "Default answer length limit in tokens for each question.", check=positive)
    context_budget_mb: float = setting(
        0,
        "MiB of encoded views (frame contexts: image features and the prompt prefix's cache) kept in memory over all "
        "cameras and regions; the least recently used are dropped and encoded again when next needed; 0 = no limit.",
        check=zero_or_more,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MqttSettings(Settings):
    """The broker connection, topics and Home Assistant discovery."""

    host: str = setting("localhost", "Broker host name or IP address.", check=not_blank)
    port: int = setting(1883, "Broker TCP port (usually 1883, or 8883 with TLS).", check=port_number)
    protocol: Literal["5", "3.1.1"] = setting("5", "MQTT protocol version: 5 or 3.1.1.")
    base_topic: str = setting(
        "edge-agent", "Topic prefix: topics are <base_topic>/<agent_id>/...", check=all_of(topic_levels, mqtt_text)
    )
    qos: Literal[0, 1, 2] = setting(1, "QoS of published answers: 0, 1 or 2.")
    tls_ca_file: Optional[str] = setting(
        None,
        "CA certificate file (PEM); enables TLS with certificate verification; null = plain TCP.",
        check=not_blank,
    )
    tls_insecure: bool = setting(False, "Skip the broker host name check (TLS only; for tests, not production).")
    username: Optional[str] = setting(None, "User name; null = anonymous.", check=mqtt_text)
    password_file: Optional[str] = setting(
        None,
        "File holding the password; relative paths resolve in $CREDENTIALS_DIRECTORY under systemd.",
        check=not_blank,
    )
    client_id: Optional[str] = setting(
        None, "MQTT client id; null = edge-agent-<agent_id>.", check=all_of(not_blank, mqtt_text)
    )
    keepalive_s: int = setting(
        60, "Seconds between keepalive pings.", check=at_most(65535, "seconds", "MQTT sends it in 16 bits")
    )
    queue_limit: int = setting(100, "Most answers kept while disconnected (oldest dropped first).", check=positive)
    heartbeat_s: float = setting(
        0.0, "Republish unchanged states this often in seconds; 0 = only on change.", check=zero_or_more
    )
    ask_per_minute: float = setting(
        30.0,
        "Ad hoc questions answered per minute for each requester (reply topic); more get a refusal.",
        check=positive,
    )
    ask_burst: int = setting(
        5, "Ad hoc questions a requester may send at once before the rate applies.", check=positive
    )
    discovery: bool = setting(True, "Publish Home Assistant discovery configs for every question.")
    discovery_prefix: str = setting(
        "homeassistant", "Home Assistant discovery topic prefix.", check=all_of(topic_levels, mqtt_text)
    )

    def check_together(self) -> None:
        if self.tls_insecure and not self.tls_ca_file:
            raise InvalidValue("tls_insecure", "only applies with TLS: set tls_ca_file too")
        if self.password_file and not self.username:
            raise InvalidValue("password_file", "needs username too")

    def password(self) -> str | None:
        """The broker password read from `password_file`, or None without one; never kept in the section."""
        return read_secret(self.password_file, "mqtt.password_file") if self.password_file else None

    def client_id_for(self, agent_id: str) -> str:
        """The MQTT client id of agent `agent_id`: `client_id`, or `edge-agent-<agent_id>` when unset."""
        return self.client_id or f"edge-agent-{agent_id}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SceneGateSettings(Settings):
    """When a frame counts as a new scene worth encoding again."""

    threshold: float = setting(
        0.02,
        "Mean absolute difference (0..1) of downscaled grayscale frames that counts as a change.",
        check=fraction,
    )
    size: int = setting(
        64,
        "Side in pixels of the downscaled grayscale comparison image.",
        check=at_most(256, "pixels", "a thumbnail to compare; larger only costs memory"),
    )
    max_unchanged_s: float = setting(
        300.0, "Encode at least this often in seconds even without a change; 0 = never.", check=zero_or_more
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CameraEntry(CameraSettings):
    """One camera of an agent's `cameras:`: the settings of `camera:`, and the camera's own id, scene gate and
    questions."""

    id: str = setting(
        REQUIRED,
        "Unique name of the camera in topics, Home Assistant ids and metrics (letters, digits, '_', '-').",
        check=topic_safe,
    )
    scene_gate: SceneGateSettings = setting_from(SceneGateSettings, "This camera's scene gate, as scene_gate.")
    questions: tuple[Question, ...] = setting(
        (), "The standing questions about this camera's frames; question ids are unique in the whole agent."
    )


SINGLE_CAMERA_ID = "camera"
"""The id of the camera of the single `camera:` form (status page, metrics label)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsSettings(Settings):
    """The Prometheus metrics endpoint."""

    listen: Optional[str] = setting(
        "127.0.0.1:9464",
        "host:port of the Prometheus endpoint; empty or null disables it.",
        check=listen_address,
    )

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when metrics are disabled."""
        return split_host_port(self.listen) if self.listen else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvidenceSettings(Settings):
    """The image each answer was given on: a JPEG of the question's view, published when its state changes."""

    enabled: bool = setting(
        True,
        "Publish the image behind each question's state (retained, and as a Home Assistant image entity); "
        "false publishes none and removes the image entities.",
    )
    max_side: int = setting(
        640,
        "Longest side in pixels of a published image (larger views are downscaled).",
        check=Bounds("must be between {minimum} and {maximum} pixels", minimum=64, maximum=1920),
    )
    quality: int = setting(
        80,
        "JPEG quality of a published image.",
        check=Bounds("must be between {minimum} and {maximum}", minimum=30, maximum=95),
    )
    min_interval_s: float = setting(
        5.0,
        "Least seconds between two images of one question; a change sooner is shown once the time is up.",
        check=Bounds("must be between {minimum} and {maximum} seconds", minimum=0, maximum=3600),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebSettings(Settings):
    """The status page the agent serves: what it sees and answered, asks, switches and the region helper."""

    enabled: bool = setting(True, "Serve the status page.")
    listen: str = setting(
        "127.0.0.1:8470",
        "host:port of the status page; an address beyond loopback needs password_file.",
        check=all_of(not_blank, listen_address),
    )
    password_file: Optional[str] = setting(
        None,
        "File holding the page's password (HTTP Basic, any user name); relative paths resolve in "
        "$CREDENTIALS_DIRECTORY under systemd; null = no password (loopback only).",
        check=not_blank,
    )

    def check_together(self) -> None:
        host, _ = split_host_port(self.listen)
        if self.enabled and not self.password_file and not is_loopback(host):
            reason = f"{self.listen} is reachable from the network: set web.password_file too (or listen on 127.0.0.1)"
            raise InvalidValue("listen", reason)

    def password(self) -> str | None:
        """The page's password read from `password_file`, or None without one; never kept in the section."""
        return read_secret(self.password_file, "web.password_file") if self.password_file else None


DIAGNOSTIC_ENTITY_IDS = ("camera_connected", "answer_latency")
"""The ids of the agent's diagnostic entities in Home Assistant (`mqtt.discovery.diagnostic_configs`), which
share the namespace of question ids (config topic, unique id): no question may take them."""


def host_agent_id() -> str:
    """The host name made topic-safe, so boxes sharing a broker differ without configuration."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0], flags=re.ASCII).strip("-")
    return name or "edge-agent"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(Settings):
    """Everything the agent reads from config.yaml."""

    agent_id: str = setting_from(
        host_agent_id,
        "Name of this box in topics and Home Assistant ids (letters, digits, '_', '-'); default: host name.",
        check=topic_safe,
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "Log verbosity: debug, info, warning or error."
    )
    camera: CameraSettings = setting_from(CameraSettings, "The camera or video source.")
    model: ModelSettings = setting(REQUIRED, "The vision-language model and its devices.")
    mqtt: MqttSettings = setting_from(MqttSettings, "The MQTT broker and Home Assistant discovery.")
    scene_gate: SceneGateSettings = setting_from(SceneGateSettings, "Skipping frames that show nothing new.")
    question_defaults: QuestionDefaults = setting_from(
        QuestionDefaults, "Defaults of every question's confirm and min_confidence: states that do not flap."
    )
    questions: tuple[Question, ...] = setting((), "The standing questions answered about each new scene.")
    cameras: tuple[CameraEntry, ...] = setting(
        (),
        "Several cameras, each with its id, the settings of camera, its scene_gate and its questions; "
        "replaces camera, scene_gate and questions.",
    )
    metrics: MetricsSettings = setting_from(MetricsSettings, "The Prometheus metrics endpoint.")
    state_dir: Optional[str] = setting_from(
        default_state_dir,
        "Where the agent keeps which questions are enabled; default: $STATE_DIRECTORY, else "
        "~/.local/state/edge-agent; null = nowhere.",
        check=not_blank,
    )
    evidence: EvidenceSettings = setting_from(EvidenceSettings, "The image behind each answer: what the model saw.")
    web: WebSettings = setting_from(WebSettings, "The status page served by the agent.")

    def check_together(self) -> None:
        if self.cameras:
            self._check_cameras_alone()
        keys = self._question_keys()
        ids = [question.id for question in self.all_questions]
        reserved = set(DIAGNOSTIC_ENTITY_IDS) | {camera_connected_id(camera.id) for camera in self.cameras}
        taken = next((index for index, id in enumerate(ids) if id in reserved), None)
        if taken is not None:
            reason = f"{ids[taken]!r} is the id of one of the agent's own Home Assistant entities; choose another"
            raise InvalidValue(f"{keys[taken]}.id", reason)
        duplicate = first_duplicate(ids)
        if duplicate is not None:
            first = ids.index(ids[duplicate])
            reason = f"duplicate id {ids[duplicate]!r} (also {keys[first]})"
            raise InvalidValue(f"{keys[duplicate]}.id", reason)
        camera_ids = [camera.id for camera in self.cameras]
        duplicate = first_duplicate(camera_ids)
        if duplicate is not None:
            raise InvalidValue(f"cameras[{duplicate}].id", f"duplicate id {camera_ids[duplicate]!r}")

    def _check_cameras_alone(self) -> None:
        """`cameras:` replaces `camera:`, `scene_gate:` and `questions:`: a config using both forms is refused
        (a `camera:` or `scene_gate:` section that only repeats the defaults is not noticed)."""
        for key, single, default in (
            ("questions", self.questions, ()),
            ("camera", self.camera, CameraSettings()),
            ("scene_gate", self.scene_gate, SceneGateSettings()),
        ):
            if single != default:
                raise InvalidValue(key, "cannot be used with cameras: give each camera its own in cameras[...]")

    def _question_keys(self) -> list[str]:
        """The config key of each question of `all_questions`, in the same order."""
        if not self.cameras:
            return [f"questions[{index}]" for index in range(len(self.questions))]
        return [
            f"cameras[{number}].questions[{index}]"
            for number, camera in enumerate(self.cameras)
            for index in range(len(camera.questions))
        ]

    @property
    def all_cameras(self) -> tuple[CameraEntry, ...]:
        """The agent's cameras: those of `cameras:`, or the camera of the single form (`camera:`, `scene_gate:`
        and `questions:`) with the id `SINGLE_CAMERA_ID`."""
        if self.cameras:
            return self.cameras
        capture = {field.name: getattr(self.camera, field.name) for field in dataclasses.fields(CameraSettings)}
        return (CameraEntry(id=SINGLE_CAMERA_ID, scene_gate=self.scene_gate, questions=self.questions, **capture),)

    @property
    def all_questions(self) -> tuple[Question, ...]:
        """Every standing question of the agent, camera after camera."""
        return tuple(question for camera in self.all_cameras for question in camera.questions)

    @property
    def several_cameras(self) -> bool:
        """Whether the config lists `cameras:` (its topics and entities name each camera), rather than the single
        `camera:` of old, whose topics and entities stay as they were."""
        return bool(self.cameras)


def camera_connected_id(camera_id: str) -> str:
    """The object id of a listed camera's "camera connected" entity in Home Assistant."""
    return f"{camera_id}_{DIAGNOSTIC_ENTITY_IDS[0]}"


def first_duplicate(items: list) -> int | None:
    """Index of the first item equal to an earlier one, or None when all differ."""
    seen = set()
    for index, item in enumerate(items):
        if item in seen:
            return index
        seen.add(item)
    return None


# Loading -----------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config file; every problem is one `UserError` line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"{path}: cannot read config file: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: config file is not UTF-8 text") from None
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: {_yaml_problem(error)}") from None
    return parse_config(mapping, source=str(path))


def parse_config(mapping: Any, source: str = "config.yaml") -> Config:
    """Validate an already loaded mapping; `source` prefixes error messages."""
    try:
        return _parse_section(Config, mapping, "")
    except InvalidValue as error:
        raise UserError(f"{source}: {error}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {problem}"


def _parse_section(cls: type, value: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping; a missing or empty section means all defaults."""
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise InvalidValue(path, f"must be a mapping of settings, got {_show(value)}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            raise InvalidValue(path, _unknown_key(key, list(fields)))
    hints = typing.get_type_hints(cls)
    arguments = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name in value:
            arguments[name] = _convert(value[name], hints[name], key_path)
        elif dataclasses.is_dataclass(hints[name]):
            arguments[name] = _parse_section(hints[name], {}, key_path)
        elif field.default is REQUIRED and field.default_factory is REQUIRED:
            raise InvalidValue(key_path, "missing required key")
    try:
        return cls(**arguments)
    except InvalidValue as error:
        raise error.under(path) from None


def _convert(value: Any, hint: Any, path: str) -> Any:
    if isinstance(value, str) and "\0" in value:  # paths, MQTT and C libraries all end a string there
        raise InvalidValue(path, "must not contain U+0000 (NUL)")
    if dataclasses.is_dataclass(hint):
        return _parse_section(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is Literal:
        return _literal(value, typing.get_args(hint), path)
    if origin in (Union, types.UnionType):
        return _union(value, typing.get_args(hint), path)
    if origin is tuple:
        return _sequence(value, typing.get_args(hint)[0], path)
    return _scalar(value, hint, path)


def finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


_SCALARS: dict[type, tuple[str, Callable[[Any], bool], str]] = {
    str: ("a string", lambda value: isinstance(value, str), "string"),
    bool: ("true or false", lambda value: isinstance(value, bool), "boolean"),
    int: ("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool), "integer"),
    float: ("a number", finite_number, "number"),
}
"""Per scalar type: how errors describe it, which loaded YAML values it accepts, its JSON Schema type."""


def _scalar(value: Any, hint: type, path: str) -> Any:
    description, accepts, _ = _SCALARS[hint]
    if not accepts(value):
        raise InvalidValue(path, f"must be {description}, got {_show(value)}")
    return hint(value)


def _literal(value: Any, choices: tuple, path: str) -> Any:
    """One of `choices`; a number also matches a text choice with the same spelling (protocol: 5)."""
    for choice in choices:
        if any(type(value) is type(spelling) and value == spelling for spelling in _spellings(choice)):
            return choice
    names = ", ".join(str(choice) for choice in choices)
    raise InvalidValue(path, f"must be one of {names}, got {_show(value)}")


def _spellings(choice: Any) -> list:
    """The YAML values that mean `choice`: itself, and for a text choice the number written the same way."""
    if isinstance(choice, str):
        for number in (int, float):
            try:
                if str(number(choice)) == choice:
                    return [choice, number(choice)]
            except ValueError:
                continue
    return [choice]


def _union(value: Any, members: tuple, path: str) -> Any:
    if value is None and type(None) in members:
        return None
    candidates = [member for member in members if member is not type(None)]
    if len(candidates) == 1:
        return _convert(value, candidates[0], path)
    for member in candidates:
        try:
            return _convert(value, member, path)
        except InvalidValue:
            continue
    names = " or ".join(_SCALARS[member][0] for member in candidates)
    raise InvalidValue(path, f"must be {names}, got {_show(value)}")


def _sequence(value: Any, item_hint: Any, path: str) -> tuple:
    if not isinstance(value, list):
        raise InvalidValue(path, f"must be a list, got {_show(value)}")
    return tuple(_convert(item, item_hint, f"{path}[{index}]") for index, item in enumerate(value))


def _unknown_key(key: Any, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "expected one of " + ", ".join(names)
    return f"unknown key {_show(key)} ({hint})"


def _show(value: Any) -> str:
    """A short description of a loaded YAML value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


# JSON Schema -------------------------------------------------------------------------------------


def config_schema() -> dict:
    """A JSON Schema (draft 2020-12) of config.yaml for editors, generated from the dataclasses above.

    Types, defaults, descriptions and enums come from the fields, bounds and patterns from their checks
    (`json_schema`). Cross-field rules (e.g. `stale_after_s` against `fps`) only the loader checks.
    """
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edge-agent config.yaml",
        **_section_schema(Config),
    }


def _section_schema(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = [field.name for field in fields if field.default is REQUIRED and field.default_factory is REQUIRED]
    schema = {
        "type": "object",
        "description": " ".join(cls.__doc__.split()),
        "properties": {field.name: _field_schema(field, hints[field.name]) for field in fields},
        "additionalProperties": False,
        **_together_schema(cls),
    }
    return {**schema, "required": required} if required else schema


def _together_schema(cls: type) -> dict:
    """The JSON Schema of a section's rules on several fields (`Settings.rules_together`)."""
    stated = [json_schema_of(rule) for rule in getattr(cls, "rules_together", ())]
    return {"allOf": stated} if stated else {}


def _field_schema(field: dataclasses.Field, hint: Any) -> dict:
    typed, stated = _type_schema(hint), json_schema_of(field.metadata["check"])
    if dataclasses.is_dataclass(hint):
        typed["type"] = ["object", "null"]  # an empty section means all defaults
    schema = {"allOf": [typed, stated]} if typed.keys() & stated.keys() else {**typed, **stated}
    schema["description"] = field.metadata["doc"]  # a section's field says more than its class
    if field.default is not REQUIRED:
        schema["default"] = list(field.default) if isinstance(field.default, tuple) else field.default
    return schema


def _type_schema(hint: Any) -> dict:
    """The JSON Schema of the values `_convert` accepts for `hint`."""
    if dataclasses.is_dataclass(hint):
        return _section_schema(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        return {"enum": [spelling for choice in typing.get_args(hint) for spelling in _spellings(choice)]}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(member) for member in typing.get_args(hint)]}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(hint)[0])}
    if hint is type(None):
        return {"type": "null"}
    return {"type": _SCALARS[hint][2]}
