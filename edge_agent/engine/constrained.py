"""Constrained answers: pick one of a question's options from the model's own distribution, or decode digits only.

A yes/no or multiple-choice question does not need free text and a parser: the probability the model
gives each option's tokens right after the prompt decides it in one forward step (single-token options)
or one more teacher-forced step (longer options). Each option is scored over the spellings a model may
produce ("Yes", "yes", " Yes", ...), the scores are summed per option, and the winner's share of the total
is its confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One question for `Engine.answer`.

    Free text by default; with `options` the answer is the most probable option (no free decoding); with
    `digits` free decoding may only emit digit tokens (and whitespace), then end.
    """

    text: str
    max_new_tokens: int = 32
    options: tuple[str, ...] = ()
    digits: bool = False
    ignore_eos: bool = False
    """A free answer runs to `max_new_tokens` past the model's stop tokens (benchmarks compare fixed lengths)."""


def spellings(option: str) -> list[str]:
    """How a model may start its answer with `option`: as written, lower-case, capitalised, after a space."""
    forms = dict.fromkeys([option, option.lower(), option[:1].upper() + option[1:]])
    return [prefix + form for form in forms for prefix in ("", " ")]


def continuation(prompt_ids: np.ndarray, extended_ids: np.ndarray) -> tuple[int, ...] | None:
    """The ids `extended_ids` adds after `prompt_ids`, or None when the tokenizer merged across the boundary."""
    n = len(prompt_ids)
    if len(extended_ids) <= n or not np.array_equal(extended_ids[:n], prompt_ids):
        return None
    return tuple(int(t) for t in extended_ids[n:])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def spelling_score(
    first_log_probs: np.ndarray, later_log_probs: dict[tuple[int, int], float], ids: tuple[int, ...]
) -> float:
    """The log-probability of one spelling of an option: its first token from the question's distribution
    (`first_log_probs`), each later token from its teacher-forced branch ({(position, token): log-prob})."""
    return first_log_probs[ids[0]] + sum(later_log_probs[(j, ids[j + 1])] for j in range(len(ids) - 1))


def option_probabilities(option_scores: list[list[float]]) -> np.ndarray:
    """Per option, the log-probabilities of its spellings -> the options' normalised probabilities."""
    totals = np.array([np.logaddexp.reduce(scores) if scores else -np.inf for scores in option_scores])
    weights = np.exp(totals - totals.max())
    return weights / weights.sum()


def finite_confidence(probability: float) -> float | None:
    """The chosen option's probability as its confidence, or None when it is not a number.

    Damaged language-model weights give NaN logits and so NaN probabilities; the option is still chosen
    (the first), but a NaN confidence would make the published JSON invalid for strict parsers.
    """
    return probability if math.isfinite(probability) else None


@dataclass(frozen=True)
class DigitVocabulary:
    """Which tokens may write a number: it may open with spaces, then digits only, then it ends."""

    opening: np.ndarray  # bool [vocab]: whitespace, or digits after optional whitespace ("1", " 23", "▁")
    continuing: np.ndarray  # bool [vocab]: digits only, no whitespace
    blank: np.ndarray  # bool [vocab]: whitespace only

    @classmethod
    def from_token_texts(cls, token_texts: list[str]) -> "DigitVocabulary":
        def digits(text: str) -> bool:
            return text.isascii() and text.isdigit()

        blank = np.array([bool(text) and not text.strip() for text in token_texts])
        continuing = np.array([digits(text) for text in token_texts])
        opening = blank | np.array([digits(text.lstrip()) for text in token_texts])
        return cls(opening=opening, continuing=continuing, blank=blank)

    def allowed(self, so_far: list[int], stop: list[int]) -> np.ndarray:
        if all(self.blank[token] for token in so_far):
            return self.opening
        allowed = self.continuing.copy()
        allowed[stop] = True
        return allowed
