"""The stateful language model: one KV cache holding a frame's shared prefix, read by one row per question.

The engine runs it on devices other than the CPU, and on the CPU where paged attention (`paged.py`) does not
fit the graph or its compile settings.

The exported graph keeps its KV cache in OpenVINO state variables and gathers cache rows by `beam_idx`
before every call. Two small edits of the graph make a shared prefix cheap:
- `attention_allowed` replaces the graph's own causal-and-padding mask, so the caller decides which cache
  positions each new token sees. One call can then prefill the prefix and every question after it as one
  sequence, each question seeing the prefix and itself only. That matters on the CPU, where each call of
  the compressed matmuls costs nearly as much for 64 tokens as for 600: the prefix and the questions share
  one pass over the weights instead of paying for two.
- `logits_positions`: the LM head runs only at the positions the caller reads.
Questions then decode in the same sequence: each step appends one token per unfinished question, which
sees the prefix, its question and its own answer so far. The prefix stays in the cache once and each step
reads it once, not once per question. Positions a token must not see (other questions and answers, earlier
rounds' leftovers) stay in the cache, masked out, until they outgrow the prefix: then a round starts again
from the prefix, which is cheaper than reading them on every call. A graph the mask edit does not fit
prefills the questions as a batch of rows forked from the prefix instead (`beam_idx = [0] * N`, one more
call) and decodes them as rows of a batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from .devices import compile_properties
from .session import BranchReducer

ATTENTION_ALLOWED = "attention_allowed"
LOGITS_POSITIONS = "logits_positions"
ATTENTION_OPS = ("ScaledDotProductAttention", "PagedAttentionExtension")
RESHAPING_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert")


def add_logits_positions(model: ov.Model, token_axis: int = 1) -> bool:
    """Compute the LM head, and the last layer after its attention, only at the positions listed in a new
    input `logits_positions` (i64 [K]).

    Exported graphs compute them for every position: for a 600-token prefix that is 600 x vocab logits nobody
    reads (about a tenth of the prefix's compute and 75 MB for a 32k vocabulary). The last layer's attention
    still runs for every position, since it writes their keys and values, but its output projection, MLP and
    the final norm only feed the head: gathering the rows before them saves most of a layer's matmuls (3%
    of a 24-layer model's pass over a prefix). Where the last layer does not end in the usual output
    projection and residual add, the rows are gathered right before the head instead.
    Tokens lie along axis 1 of the hidden states ([batch, tokens, hidden]); a paged-attention graph has them
    along axis 0. Returns False, leaving the graph as it is, when the head is not a MatMul right before the
    output.
    """
    head = _skip_converts(model.output("logits").get_node().input_value(0).get_node())
    if head.get_type_name() != "MatMul":
        return False
    positions = _new_input(model, LOGITS_POSITIONS, [-1], ov.Type.i64)
    tail = _last_layer_tail(model)
    cuts = [head.input(0)] if tail is None else list(tail)
    for cut in cuts:
        cut.replace_source_output(ops.gather(cut.get_source_output(), positions, ops.constant(token_axis)).output(0))
    model.validate_nodes_and_infer_types()
    return True


def _skip_converts(node: ov.Node) -> ov.Node:
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node


def _last_layer_tail(model: ov.Model) -> tuple[ov.Input, ov.Input] | None:
    """Where the last attention layer's output projection and its residual add read their inputs, or None.

    The projection is the MatMul that the last attention op's output reaches through shape changes only; the
    residual add is the first Add after it whose other input is not a constant (a constant is a bias).
    """
    attention = [node for node in model.get_ordered_ops() if node.get_type_name() in ATTENTION_OPS]
    if not attention:
        return None
    projection = _only_consumer(attention[-1])
    while projection is not None and projection.get_type_name() in RESHAPING_OPS:
        projection = _only_consumer(projection)
    if projection is None or projection.get_type_name() != "MatMul":
        return None
    source, add = projection, _only_consumer(projection)
    while add is not None and add.get_type_name() == "Add":
        other = [port for port in add.inputs() if port.get_source_output().get_node() is not source]
        if len(other) != 1:
            return None
        if _skip_converts(other[0].get_source_output().get_node()).get_type_name() != "Constant":
            return projection.input(0), other[0]
        source, add = add, _only_consumer(add)
    return None


def _only_consumer(node: ov.Node) -> ov.Node | None:
    """The one node that reads `node`'s (first) output, or None when several do."""
    if len(node.output(0).get_target_inputs()) != 1:
        return None
    return next(iter(node.output(0).get_target_inputs())).get_node()


def add_attention_allowed(model: ov.Model) -> bool:
    """Replace the mask every attention layer shares with a new input `attention_allowed` (bool [B, 1, Q, KV]).

    Exported graphs build one mask from `attention_mask` and the causal rule and feed it, through a Select
    that turns it into 0 / -inf, to every ScaledDotProductAttention. Returns False, leaving the graph as it
    is, when the layers do not share one such Select.
    """
    attention = [node for node in model.get_ops() if node.get_type_name() == "ScaledDotProductAttention"]
    masks = {node.input_value(3).get_node() for node in attention if node.get_input_size() > 3}
    if not attention or len(masks) != 1 or len(attention[0].inputs()) <= 3:
        return False
    select = masks.pop()
    if select.get_type_name() != "Select" or select.get_output_partial_shape(0).rank.get_length() != 4:
        return False
    allowed = _new_input(model, ATTENTION_ALLOWED, [-1, 1, -1, -1], ov.Type.boolean)
    select.input(0).replace_source_output(allowed.output(0))
    model.validate_nodes_and_infer_types()
    return True


def _new_input(model: ov.Model, name: str, shape: list[int], element_type: ov.Type):
    parameter = ops.parameter(shape, element_type, name=name)
    parameter.output(0).get_tensor().set_names({name})
    model.add_parameters([parameter])
    return parameter


def causal(mask: np.ndarray, width: int) -> np.ndarray:
    """The usual rule as `attention_allowed`: each of the last `width` positions sees the unmasked ones up to it."""
    keys = mask.shape[1]
    up_to_itself = np.arange(keys)[None, :] <= np.arange(keys - width, keys)[:, None]  # [width, keys]
    return (mask.astype(bool)[:, None, :] & up_to_itself[None])[:, None]


def left_padded(chunks: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Chunks [L_i, hidden] as one left-padded batch [N, max L_i, hidden] (pads are zeros), and the lengths."""
    lengths = [len(chunk) for chunk in chunks]
    padded = np.zeros((len(chunks), max(lengths), chunks[0].shape[1]), dtype=np.float32)
    for row, chunk in enumerate(chunks):
        padded[row, padded.shape[1] - len(chunk) :] = chunk
    return padded, lengths


class StatefulLanguageModel:
    """The compiled language model and the one infer request, so one KV cache, that its sessions take turns on.

    One request bounds memory whatever the number of live frame contexts (each request holds its own cache
    and its own working buffers, a few hundred MB for a 0.4B model). A session that finds another session's
    cache in the request starts again from its prefix, prefilled with its next questions.
    """

    def __init__(self, compiled: ov.CompiledModel):
        names = {name for port in compiled.inputs for name in port.get_names()}
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.gathers_logits = LOGITS_POSITIONS in names
        self.takes_allowed = ATTENTION_ALLOWED in names
        self.cache_owner: StatefulSession | None = None

    def session(self, prefix: np.ndarray) -> "StatefulSession":
        """A session for one frame's prefix embeddings [1, P, hidden]; nothing is computed yet."""
        return StatefulSession(self, prefix)

    @classmethod
    def load(
        cls, core: ov.Core, graph_path: Path, device: str, inference_precision: str | None = None, **overrides
    ) -> "StatefulLanguageModel":
        """Read an exported language model, make both edits where they fit and compile it with the engine's
        settings for `device` (`overrides` replace single compile properties, for measurements)."""
        graph = core.read_model(graph_path)
        add_logits_positions(graph)
        add_attention_allowed(graph)
        properties = {**compile_properties(device, inference_precision, graph), **overrides}
        return cls(core.compile_model(graph, device, properties))


class StatefulSession:
    """One frame's prefix and the bookkeeping of what the language model's KV cache holds for it (a
    `session.LanguageSession`).

    The session works in rows: row i of the last call's answer. In the shared sequence every row lives in
    the one cache row; forked rows each have their own cache row, row i in cache row i.
    """

    def __init__(self, model: StatefulLanguageModel, prefix: np.ndarray):
        self._model = model
        self._prefix = prefix  # [1, P, hidden]
        self.prefix_len = prefix.shape[1]
        self.kv_len = 0  # 0: nothing cached, the prefix goes in with the next questions
        self._mask = np.zeros((0, 0), dtype=np.int64)  # per row: which cache positions it attends to
        self._next_position = np.zeros(0, dtype=np.int64)  # per row: position id of its next token

    @property
    def _request(self) -> ov.InferRequest:
        return self._model.request

    def _take_over_cache(self) -> None:
        """Make the request's cache this session's; if another session has used it since, ours is gone."""
        if self._model.cache_owner is not self:
            self._empty_cache()

    def _empty_cache(self) -> None:
        self._model.cache_owner = self
        self._request.reset_state()
        self.kv_len = 0

    @property
    def cached_bytes(self) -> int:
        """Nothing: the one cache is the request's, and a session that finds another's there starts again."""
        return 0

    @property
    def leftover_positions(self) -> int:
        """Cache positions past the prefix left over from earlier rounds."""
        return max(self.kv_len - self.prefix_len, 0) if self._model.cache_owner is self else 0

    def restart(self) -> None:
        """Drop the cache; the next questions prefill the prefix again (in the same call where possible)."""
        self._empty_cache()

    def prefill_prefix(self) -> None:
        """Cache the prefix on its own, now (the questions would otherwise bring it along)."""
        self._empty_cache()
        length = self.prefix_len
        self._run(
            self._prefix,
            np.ones((1, length), dtype=np.int64),
            np.arange(length)[None],
            beam_idx=np.zeros(1, dtype=np.int32),
            logits_at=[length - 1],
        )
        self._next_position = np.array([length])

    def prefill_questions(
        self,
        questions: list[np.ndarray],
        branches: list[tuple[int, np.ndarray]] = (),
        reduce: BranchReducer | None = None,
    ) -> tuple[np.ndarray, list]:
        """Prefill question suffixes (each [S_i, hidden]) after the prefix, and `branches` after their questions.

        A branch (question row, embeds [L, hidden]) is a teacher-forced continuation of that question (the
        first tokens of an answer option); it is scored, never decoded further.
        Returns the questions' next-token logits [N, vocab] and each branch's logits [L, vocab] (position j
        predicts the token after branch token j), or with `reduce`, `reduce(branch index, its logits)`.
        Afterwards row i is question i, seeing the prefix and its own question only.
        """
        self._take_over_cache()
        if self.leftover_positions > self.prefix_len:  # reading them on costs more than prefilling the prefix again
            self.restart()
        if self._model.takes_allowed:
            logits, branch_logits = self._prefill_shared_sequence(questions, branches)
        else:
            logits, branch_logits = self._prefill_forked_rows(questions, branches)
        return logits, [reduce(index, each) for index, each in enumerate(branch_logits)] if reduce else branch_logits

    def _prefill_forked_rows(self, questions, branches) -> tuple[np.ndarray, list[np.ndarray]]:
        """Questions as a batch of rows forked from the prefix's row; branches as a second call, extra rows."""
        if self.kv_len == 0:
            self.prefill_prefix()
        count = len(questions)
        padded, lengths = left_padded(questions)
        prefix_only = np.zeros((count, self.kv_len), dtype=np.int64)
        prefix_only[:, : self.prefix_len] = 1
        logits = self._append(
            prefix_only,
            padded,
            lengths,
            beam_idx=np.zeros(count, dtype=np.int32),
            start=np.full(count, self.prefix_len),
            logits_at=[padded.shape[1] - 1],
        )[:, 0]
        if not branches:
            return logits, []
        chunks = [chunk for _, chunk in branches]
        padded, lengths = left_padded([question[:0] for question in questions] + chunks)  # questions: carried along
        branch_logits = self.extend(list(range(count)) + [row for row, _ in branches], padded, lengths)
        width = padded.shape[1]
        return logits, [branch_logits[count + index, width - len(chunk) :] for index, chunk in enumerate(chunks)]

    def _prefill_shared_sequence(self, questions, branches) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call, one cache row: [prefix, if not cached yet] + question 1 + ... + question N + branches.

        Each question sees the prefix and itself; each branch the prefix, its question and itself.
        """
        cached, prefix = self.kv_len, self.prefix_len
        segments = list(questions) + [chunk for _, chunk in branches]
        parents = [None] * len(questions) + [row for row, _ in branches]
        sequence = np.concatenate(([] if cached else [self._prefix[0]]) + segments, axis=0)[None]
        width = sequence.shape[1]
        allowed = np.zeros((width, cached + width), dtype=bool)
        allowed[:, :prefix] = True  # every new token sees the prefix (causally, below, while writing it)
        positions = np.zeros(width, dtype=np.int64)
        if not cached:
            allowed[:prefix, :prefix] = np.tril(np.ones((prefix, prefix), dtype=bool))
            positions[:prefix] = np.arange(prefix)
        ends = np.cumsum([len(segment) for segment in segments]) + (0 if cached else prefix)
        spans = [slice(end - len(segment), end) for segment, end in zip(segments, ends)]
        for span, parent in zip(spans, parents):
            first_position = prefix
            if parent is not None:
                allowed[span, cached + spans[parent].start : cached + spans[parent].stop] = True
                first_position += len(questions[parent])
            length = span.stop - span.start
            allowed[span, cached + span.start : cached + span.stop] = np.tril(np.ones((length, length), dtype=bool))
            positions[span] = first_position + np.arange(length)
        question_spans, branch_spans = spans[: len(questions)], spans[len(questions) :]
        logits_at = [span.stop - 1 for span in question_spans] + [
            i for span in branch_spans for i in range(span.start, span.stop)
        ]
        logits = self._run(
            sequence,
            np.ones((1, cached + width), dtype=np.int64),
            positions[None],
            beam_idx=np.zeros(1, dtype=np.int32),
            logits_at=logits_at,
            allowed=allowed[None, None],
        )[0]
        self._mask = np.zeros((len(questions), cached + width), dtype=np.int64)
        self._mask[:, :prefix] = 1
        for row, span in enumerate(question_spans):
            self._mask[row, cached + span.start : cached + span.stop] = 1
        self._next_position = np.array([prefix + len(question) for question in questions])
        branch_logits = np.split(logits[len(questions) :], np.cumsum([len(chunk) for _, chunk in branches])[:-1])
        return logits[: len(questions)], branch_logits if branches else []

    def extend(self, rows, embeds: np.ndarray, lengths: list[int]) -> np.ndarray:
        """Append left-padded token chunks [B, W, hidden] to `rows` (a row may be repeated).

        A row with length 0 is carried along unchanged. Returns the logits at every chunk position
        [B, W, vocab] (position j predicts the token after chunk token j).
        """
        rows = np.asarray(rows, dtype=np.int32)
        return self._append(
            self._mask[rows],
            embeds,
            lengths,
            beam_idx=rows,
            start=self._next_position[rows],
            logits_at=list(range(embeds.shape[1])),
        )

    def _append(self, base_mask, embeds, lengths, beam_idx, start, logits_at: list[int]) -> np.ndarray:
        width = embeds.shape[1]
        lengths = np.asarray(lengths, dtype=np.int64)
        column = np.arange(width)[None, :]
        real = column >= (width - lengths)[:, None]  # left padding
        mask = np.concatenate([base_mask, real.astype(np.int64)], axis=1)
        positions = np.where(real, start[:, None] + column - (width - lengths)[:, None], 1)
        logits = self._run(embeds, mask, positions, beam_idx=beam_idx, logits_at=logits_at)
        self._mask = mask
        self._next_position = start + lengths
        return logits

    def step(self, embeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One decode step for `rows` (indices into the last call's rows), embeds [len(rows), 1, hidden].

        Returns the next-token logits [len(rows), vocab]; afterwards row i is `rows[i]`.
        """
        rows = np.asarray(rows, dtype=np.int32)
        if self._model.takes_allowed:
            return self._step_shared_sequence(embeds, rows)
        mask = np.concatenate([self._mask[rows], np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        positions = self._next_position[rows]
        logits = self._run(embeds, mask, positions[:, None], beam_idx=rows, logits_at=[0])[:, 0]
        self._mask = mask
        self._next_position = positions + 1
        return logits

    def _step_shared_sequence(self, embeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The rows' next tokens appended to the one cache row, each seeing what its row saw and itself.

        The prefix stays in the cache once and is read once per step, whatever the number of rows.
        """
        count = len(rows)
        seen = np.concatenate([self._mask[rows], np.eye(count, dtype=np.int64)], axis=1)
        positions = self._next_position[rows]
        logits = self._run(
            embeds.reshape(1, count, -1),
            np.ones((1, seen.shape[1]), dtype=np.int64),
            positions[None],
            beam_idx=np.zeros(1, dtype=np.int32),
            logits_at=list(range(count)),
            allowed=seen.astype(bool)[None, None],
        )[0]
        self._mask = seen
        self._next_position = positions + 1
        return logits

    def _run(self, embeds, mask, positions, beam_idx, logits_at: list[int], allowed=None) -> np.ndarray:
        """One inference; returns the logits at the call's positions `logits_at` [B, len(logits_at), vocab].

        `mask` [B, KV] marks the cache positions each row may see; without `allowed` the usual causal rule
        applies on top of it.
        """
        inputs = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "attention_mask": mask,
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            "beam_idx": beam_idx,
        }
        if self._model.takes_allowed:
            inputs[ATTENTION_ALLOWED] = causal(mask, embeds.shape[1]) if allowed is None else allowed
        if self._model.gathers_logits:
            inputs[LOGITS_POSITIONS] = np.asarray(logits_at, dtype=np.int64)
        self._request.infer(inputs)
        self.kv_len = mask.shape[1]
        logits = self._request.get_tensor("logits").data
        return (logits if self._model.gathers_logits else logits[:, logits_at]).copy()
