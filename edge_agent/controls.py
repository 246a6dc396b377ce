"""Which standing questions are enabled, kept across restarts in the state directory.

Every question starts enabled. Home Assistant's switch (or any client allowed to write the command topic,
see `edge_agent.mqtt.commands`) turns one off or on; the inference thread applies the change and saves the
whole set to `<state_dir>/controls.json`:

    {"enabled": {"door_open": false, "people": true}}

The file is written beside and renamed over the old one, so a crash or power cut leaves the old file or the
new one, never a torn one. It is read once at start: ids of questions no longer configured are ignored, and a
file that is unreadable, too large or not of this form is one warning and every question starts enabled.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CONTROLS_FILE = "controls.json"
MAX_FILE_BYTES = 64 * 1024
"""A larger controls file is not read (the agent writes one entry per configured question: a few KiB)."""


class Controls:
    """The enabled state of every configured question, and where it is kept (`path`; None: not kept)."""

    def __init__(self, question_ids: Iterable[str], path: Path | None = None):
        self._enabled = dict.fromkeys(question_ids, True)
        self.path = path

    @classmethod
    def load(cls, question_ids: Iterable[str], state_dir: str | None) -> Controls:
        """The controls saved in `state_dir` for these questions (all enabled without a usable file)."""
        controls = cls(question_ids, Path(state_dir, CONTROLS_FILE) if state_dir else None)
        if controls.path is not None and controls.path.exists():
            saved, problem = read_saved(controls.path)
            if problem:
                log.warning("%s: %s; every question starts enabled", controls.path, problem)
            for question_id, enabled in saved.items():
                if question_id in controls._enabled:
                    controls._enabled[question_id] = enabled
        return controls

    def enabled(self, question_id: str) -> bool:
        return self._enabled[question_id]

    @property
    def states(self) -> dict[str, bool]:
        """Question id -> enabled, in config order."""
        return dict(self._enabled)

    def set(self, question_id: str, enabled: bool) -> None:
        """Enable or disable a configured question (`save` keeps it)."""
        self._enabled[question_id] = enabled

    def save(self) -> None:
        """Write the set atomically; a failure is one warning (the change holds until the agent stops)."""
        if self.path is None:
            return
        try:
            write_atomically(self.path, json.dumps({"enabled": self._enabled}, indent=1).encode())
        except OSError as error:
            log.warning("%s: cannot save the enabled questions (%s); the change holds until restart", self.path, error)


def read_saved(path: Path) -> tuple[dict[str, bool], str | None]:
    """The question id -> enabled pairs of a controls file, and what is wrong with it (None if nothing).

    Entries that are not a string id with a boolean are left out (and named as the problem)."""
    try:
        with path.open("rb") as file:
            content = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        return {}, f"cannot read it ({error.strerror})"
    if len(content) > MAX_FILE_BYTES:
        return {}, f"larger than {MAX_FILE_BYTES} bytes"
    try:
        saved = json.loads(content)
    except (ValueError, RecursionError):
        return {}, "not JSON"
    entries = saved.get("enabled") if isinstance(saved, dict) else None
    if not isinstance(entries, dict):
        return {}, 'not of the form {"enabled": {"<question_id>": true or false}}'
    valid = {key: value for key, value in entries.items() if isinstance(value, bool)}
    if len(valid) < len(entries):
        return valid, f"{len(entries) - len(valid)} entries are not true or false"
    return valid, None


def write_atomically(path: Path, content: bytes) -> None:
    """Replace `path` by `content`: written and flushed to disk beside it first, then renamed over it."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
