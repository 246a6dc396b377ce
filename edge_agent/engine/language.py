"""The stateful language model: one KV cache holding a frame's shared prefix, forked into one row per question.

The exported graph keeps its KV cache in OpenVINO state variables and gathers cache rows by `beam_idx`
before every step. That is all we need to share a prefix:
- prefill the prefix once, batch 1;
- prefill N question suffixes as one batch with `beam_idx = [0] * N`: the gather copies the prefix row into
  N rows. Suffixes are left-padded; the padding is masked out;
- decode with `beam_idx` = the rows still generating, so finished rows drop out of the batch.
Positions a later round must not see (the previous round's questions and answers, padding) stay in the
cache but are masked out in `attention_mask`, so a context answers any number of rounds without
re-prefilling; `garbage` tells the caller when it is cheaper to start again from the prefix.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops

LOGITS_TO_KEEP = "logits_to_keep"


def keep_only_last_logits(model: ov.Model) -> bool:
    """Let the caller choose how many trailing positions get logits (a new scalar input `logits_to_keep`).

    Exported graphs compute the LM head for every position: for a 600-token prefix that is 600 x vocab
    logits nobody reads (about a tenth of the prefix's compute and 75 MB for a 32k vocabulary).
    Returns False, leaving the graph as it is, when the head is not a MatMul right before the output.
    """
    head = model.output("logits").get_node().input_value(0).get_node()
    while head.get_type_name() == "Convert":
        head = head.input_value(0).get_node()
    if head.get_type_name() != "MatMul":
        return False
    keep = ops.parameter([], ov.Type.i64, name=LOGITS_TO_KEEP)
    keep.output(0).get_tensor().set_names({LOGITS_TO_KEEP})
    start = ops.unsqueeze(ops.negative(keep), ops.constant(0))
    end = ops.constant([np.iinfo(np.int64).max])
    sliced = ops.slice(head.input_value(0), start, end, ops.constant([1]), ops.constant([1]))
    head.input(0).replace_source_output(sliced.output(0))
    model.add_parameters([keep])
    model.validate_nodes_and_infer_types()
    return True


class LanguageSession:
    """One infer request of the language model and the bookkeeping of what its KV cache holds."""

    def __init__(self, compiled: ov.CompiledModel):
        self._request = compiled.create_infer_request()
        self._slices_logits = any(LOGITS_TO_KEEP in i.get_names() for i in compiled.inputs)
        self.prefix_len = 0
        self.kv_len = 0
        self._mask = np.zeros((0, 0), dtype=np.int64)  # per current row: which cache positions it attends to
        self._next_position = np.zeros(0, dtype=np.int64)  # per current row: position id of its next token

    @property
    def garbage(self) -> int:
        """Cache positions past the prefix left over from earlier rounds."""
        return self.kv_len - self.prefix_len

    def prefill_prefix(self, embeds: np.ndarray) -> None:
        """Start from an empty cache and fill it with the shared prefix ([1, P, hidden])."""
        self._request.reset_state()
        length = embeds.shape[1]
        self._run(embeds, np.ones((1, length), dtype=np.int64), np.arange(length, dtype=np.int64)[None],
                  beam_idx=np.zeros(1, dtype=np.int32))
        self._next_position = np.array([length])
        self.prefix_len = self.kv_len = length

    def prefill_questions(self, embeds: np.ndarray, lengths: list[int]) -> np.ndarray:
        """Fork the prefix into one row per question and prefill the left-padded suffixes [N, S, hidden].

        Returns the next-token logits of every row [N, vocab].
        """
        rows = embeds.shape[0]
        prefix_only = np.zeros((rows, self.kv_len), dtype=np.int64)
        prefix_only[:, :self.prefix_len] = 1
        return self._append(prefix_only, embeds, lengths, beam_idx=np.zeros(rows, dtype=np.int32),
                            start=np.full(rows, self.prefix_len), last=1)[:, -1]

    def extend(self, rows, embeds: np.ndarray, lengths: list[int]) -> np.ndarray:
        """Append left-padded token chunks [B, W, hidden] to current `rows` (a row may be repeated).

        A row with length 0 is carried along unchanged. Returns the logits at every chunk position
        [B, W, vocab] (position j predicts the token after chunk token j).
        """
        rows = np.asarray(rows, dtype=np.int32)
        return self._append(self._mask[rows], embeds, lengths, beam_idx=rows, start=self._next_position[rows],
                            last=embeds.shape[1])

    def _append(self, base_mask, embeds, lengths, beam_idx, start, last: int) -> np.ndarray:
        rows, width = embeds.shape[:2]
        lengths = np.asarray(lengths, dtype=np.int64)
        column = np.arange(width)[None, :]
        real = column >= (width - lengths)[:, None]  # left padding
        mask = np.concatenate([base_mask, real.astype(np.int64)], axis=1)
        positions = np.where(real, start[:, None] + column - (width - lengths)[:, None], 1)
        logits = self._run(embeds, mask, positions, beam_idx=beam_idx, last=last)
        self._next_position = start + lengths
        return logits

    def step(self, embeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One decode step for the current `rows` (indices into the last batch), embeds [len(rows), 1, hidden]."""
        rows = np.asarray(rows, dtype=np.int32)
        self._mask = self._mask[rows]
        self._next_position = self._next_position[rows]
        mask = np.concatenate([self._mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        logits = self._run(embeds, mask, self._next_position[:, None], beam_idx=rows)[:, -1]
        self._next_position = self._next_position + 1
        return logits

    def _run(self, embeds, mask, positions, beam_idx, last: int = 1) -> np.ndarray:
        """One inference; returns the logits of the last `last` positions [B, last, vocab]."""
        inputs = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "attention_mask": mask,
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
            "beam_idx": beam_idx,
        }
        if self._slices_logits:
            inputs[LOGITS_TO_KEEP] = np.array(last, dtype=np.int64)
        self._request.infer(inputs)
        self._mask = mask
        self.kv_len = mask.shape[1]
        return self._request.get_tensor("logits").data[:, -last:, :].copy()
