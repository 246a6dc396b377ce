"""Helpers for the tests of the language sessions: random embeddings, rounds of prefill and decode, and an
infer request that records its calls."""

from __future__ import annotations

import numpy as np
import openvino as ov

from edge_agent.engine.language import LOGITS_POSITIONS

QUESTION_LENGTHS = [5, 9, 1, 7]


class CountingRequest:
    """An infer request that records the inputs of every call."""

    def __init__(self, request: ov.InferRequest):
        self._request = request
        self.calls = []

    def infer(self, inputs):
        self.calls.append(inputs)
        return self._request.infer(inputs)

    def __getattr__(self, name):
        return getattr(self._request, name)


def hidden_size(compiled_model: ov.CompiledModel) -> int:
    return compiled_model.input("inputs_embeds").get_partial_shape()[-1].get_length()


def embeddings(rng, *shape) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def frame_inputs(compiled_model: ov.CompiledModel, seed: int, prefix_tokens: int, lengths=QUESTION_LENGTHS):
    """A random generator, a prefix [1, P, hidden] and one embedding [n, hidden] per question length."""
    hidden = hidden_size(compiled_model)
    rng = np.random.default_rng(seed)
    return rng, embeddings(rng, 1, prefix_tokens, hidden), [embeddings(rng, n, hidden) for n in lengths]


def rounds(session, questions, steps: int, rng) -> list[np.ndarray]:
    """Prefill the questions, then decode `steps` tokens of random embeddings on every row: all logits."""
    seen = [session.prefill_questions(questions)[0]]
    for _ in range(steps):
        seen.append(session.step(embeddings(rng, len(questions), 1, questions[0].shape[1]), np.arange(len(questions))))
    return seen


def gathers_of_logits_positions(graph: ov.Model) -> list[str]:
    """What each Gather of the `logits_positions` input feeds: the op type of its reader."""
    positions = next(p for p in graph.get_parameters() if LOGITS_POSITIONS in p.output(0).get_names())
    gathers = [target.get_node() for target in positions.output(0).get_target_inputs()]
    return sorted(next(iter(g.output(0).get_target_inputs())).get_node().get_type_name() for g in gathers)
