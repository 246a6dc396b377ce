"""What the engine asks of a language-model backend: a model that opens one session per frame, and the session.

Two backends keep a frame's prefix in the KV cache and answer its questions as rows of one batch: paged
attention on the CPU (`paged.py`) and the exported stateful graph elsewhere (`language.py`). The engine
works through these protocols only, so each backend keeps its own cache rules (the stateful one, for
instance, decides itself when its leftovers make a fresh start from the prefix cheaper) and both answer alike.
`tests/test_session.py` checks that each backend implements every method with the same parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import openvino as ov

BranchReducer = Callable[[int, np.ndarray], Any]
"""Reduces a branch's logits as soon as they are read: (branch index, logits [L, vocab]) -> what is kept."""


@runtime_checkable
class LanguageSession(Protocol):
    """One frame's prompt prefix and what the language model caches for it; row i is question i of the batch."""

    def prefill_prefix(self) -> None:
        """Cache the prefix on its own, now; otherwise it goes in with the first questions."""

    def prefill_questions(
        self,
        questions: list[np.ndarray],
        branches: list[tuple[int, np.ndarray]] = (),
        reduce: BranchReducer | None = None,
    ) -> tuple[np.ndarray, list]:
        """Prefill question suffixes (each [S_i, hidden]) after the prefix, and `branches` (question row, the
        first tokens of an answer option [L, hidden]) after their questions: the questions' next-token logits
        [N, vocab] and each branch's logits [L, vocab], or `reduce(branch index, its logits)`. Afterwards row i
        is question i, seeing the prefix and its own question only; earlier rounds are forgotten."""

    def step(self, embeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One decode step for `rows` (indices into the last call's rows), embeds [len(rows), 1, hidden]: the
        next-token logits [len(rows), vocab]; afterwards row i is `rows[i]`."""

    @property
    def cached_bytes(self) -> int:
        """Bytes of KV cache this session alone keeps while other sessions take their turns (its prefix's)."""


@runtime_checkable
class LanguageModel(Protocol):
    """A compiled language model whose one KV cache the sessions of all frames take turns on."""

    compiled: ov.CompiledModel
    """The compiled graph (the engine reads the vocabulary size from its `logits` output)."""

    def session(self, prefix: np.ndarray) -> LanguageSession:
        """A session for one frame's prefix embeddings [1, P, hidden]; nothing is computed yet."""
