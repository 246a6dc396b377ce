"""The language model with paged attention: the prefix cached once in blocks that every answer shares.

OpenVINO's `paged_attention_transformation` turns the exported stateful graph into one that reads and
writes its KV cache through block tables: the cache is a pool of fixed-size blocks (inputs `key_cache.N`,
`value_cache.N`, block index first), and each sequence of a call lists the blocks that hold its tokens.
A frame's answers are then sequences whose tables start with the prefix's blocks, so the prefix is cached
once, and each answer's own tokens go to blocks of its own. On the CPU this graph runs a pass over the
prefix and a decode step faster than the stateful one (benchmarks/RESULTS.md).

The calls of a round:
- the prefix, if not cached yet, with the first question after it: one sequence;
- every other question, each a sequence after the cached prefix, in one call. A sequence owns the block
  it writes to, so the prefix's last, partly filled block is copied for each of them first;
- a branch (the first tokens of an answer option, scored and never decoded) rides along in its question's
  sequence, past the end the question's row keeps; a question's further branches follow in calls of at
  most `BRANCHES_PER_CALL` sequences, each after its question's cached row (its full blocks shared, its
  partly filled last block copied) in blocks given back as soon as the call's logits are read;
- then each decode step appends one token to each unfinished answer's sequence.
A sequence sees exactly its own tokens, so nothing from other answers or earlier rounds needs masking.

Every live session keeps its prefix's blocks in the one pool, so the views of a frame (and later frames)
answer in turn without prefilling their prefixes again; a session's blocks go back to the pool when the
session is dropped. Only the answers of the last round are per call: a session that takes its turn gives
back the rows of the session before it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import openvino as ov
from openvino._offline_transformations import paged_attention_transformation

from .devices import compile_properties
from .language import LOGITS_POSITIONS, StatefulLanguageModel, add_logits_positions
from .session import BranchReducer, LanguageModel

CACHE_INPUTS = ("key_cache.", "value_cache.")
BLOCK_SIZE_AXIS = 2
"""The CPU plugin's value-cache blocks are [blocks, kv heads, block size, head size (+ u8 scales)]."""
BRANCHES_PER_CALL = 8
"""Further branches (answer options' first tokens) scored per call. A branch follows its question's cached
row, so it is only its own tokens, and a call holds at most this many branches' logits before `reduce` keeps
just the log-probabilities that are needed: the memory a choice takes is bounded whatever its options (the
block pool and the plugin's buffers keep the size of the largest call; docs/ARCHITECTURE.md, "Option
scoring")."""


def to_paged_attention(graph: ov.Model) -> bool:
    """Rewrite a stateful language model for paged attention, with the LM head at `logits_positions` only.

    Returns False when the graph holds no KV cache state (it is then left as it is), or when the rewrite
    yields no cache inputs or no LM head to gather at (it may then be half rewritten: read it again).
    """
    if not graph.get_sinks():
        return False
    paged_attention_transformation(graph)
    if not any(name.startswith(CACHE_INPUTS) for port in graph.inputs for name in port.get_names()):
        return False
    return add_logits_positions(graph, token_axis=0)


class BlockPool:
    """The cache blocks of every layer, as host tensors of the one infer request, and which are free.

    The pool grows on demand (existing blocks keep their contents); blocks are handed out and given back
    by index. A dropped session gives its blocks back from whichever thread drops it, hence the lock.
    """

    def __init__(self, compiled: ov.CompiledModel, request: ov.InferRequest):
        self._ports = [port for port in compiled.inputs if port.get_any_name().startswith(CACHE_INPUTS)]
        value = next(port for port in self._ports if port.get_any_name().startswith("value_cache."))
        self.block_size = value.get_partial_shape()[BLOCK_SIZE_AXIS].get_length()
        self._request = request
        self._tensors = []
        self.capacity = 0
        self._free: list[int] = []
        self._lock = threading.Lock()
        self.bytes_per_block = sum(  # every layer's keys and values; only the block count is dynamic
            port.get_element_type().size
            * int(np.prod([dim.get_length() for dim in list(port.get_partial_shape())[1:]]))
            for port in self._ports
        )

    def take(self, count: int) -> list[int]:
        with self._lock:
            if count > len(self._free):
                self._grow(max(self.capacity + count - len(self._free), self.capacity * 3 // 2))
            taken, self._free = self._free[:count], self._free[count:]
        return taken

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def give_back(self, blocks: list[int]) -> None:
        with self._lock:
            self._free.extend(blocks)

    def copy(self, source: int, targets: list[int]) -> None:
        """Copy block `source` (every layer's keys and values) into each of `targets`."""
        for tensor in self._tensors:
            data = tensor.data
            data[targets] = data[source]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _grow(self, capacity: int) -> None:
        tensors = []
        for index, port in enumerate(self._ports):
            shape = [capacity] + [dim.get_length() for dim in list(port.get_partial_shape())[1:]]
            tensor = ov.Tensor(port.get_element_type(), shape)
            if self._tensors:
                tensor.data[: self.capacity] = self._tensors[index].data
            self._request.set_tensor(port, tensor)
            tensors.append(tensor)
        self._tensors = tensors
        self._free.extend(range(self.capacity, capacity))
        self.capacity = capacity


@dataclass
class Sequence:
    """One sequence of a call: the tokens it adds after `past` cached ones, and the blocks that hold them all."""

    embeds: np.ndarray  # [n, hidden]
    past: int
    blocks: list[int]
    first_position: int
    logits_at: list[int]  # indices into `embeds` whose logits are returned


class Job(NamedTuple):
    """One question's sequence of a round's prefill, with branch `branch` (an index) riding along or not."""

    row: int
    branch: int | None


class PagedLanguageModel:
    """The compiled paged-attention language model, its one infer request and its block pool."""

    def __init__(self, compiled: ov.CompiledModel):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.pool = BlockPool(compiled, self.request)
        self._cache_owner = lambda: None  # a weak reference: a dropped session gives its blocks back at once

    @property
    def cache_owner(self) -> PagedSession | None:
        """The session whose turn it is (its last round's rows are in the pool), while it lives."""
        return self._cache_owner()

    @cache_owner.setter
    def cache_owner(self, session: PagedSession) -> None:
        self._cache_owner = weakref.ref(session)

    def session(self, prefix: np.ndarray) -> "PagedSession":
        """A session for one frame's prefix embeddings [1, P, hidden]; nothing is computed yet."""
        return PagedSession(self, prefix)

    def run(self, sequences: list[Sequence]) -> np.ndarray:
        """One call over `sequences`: the logits at each sequence's `logits_at` tokens, in order [K, vocab]."""
        lengths = [len(s.embeds) for s in sequences]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        logits_at = [start + i for s, start in zip(sequences, starts) for i in s.logits_at]
        self.request.infer(
            {
                "inputs_embeds": np.ascontiguousarray(np.concatenate([s.embeds for s in sequences]), dtype=np.float32),
                "position_ids": np.concatenate([s.first_position + np.arange(n) for s, n in zip(sequences, lengths)]),
                "past_lens": np.array([s.past for s in sequences], dtype=np.int32),
                "subsequence_begins": starts.astype(np.int32),
                "block_indices": np.concatenate([s.blocks for s in sequences]).astype(np.int32),
                "block_indices_begins": np.concatenate([[0], np.cumsum([len(s.blocks) for s in sequences])]).astype(
                    np.int32
                ),
                "max_context_len": np.array(max(s.past + n for s, n in zip(sequences, lengths)), dtype=np.int32),
                LOGITS_POSITIONS: np.asarray(logits_at, dtype=np.int64),
            }
        )
        return self.request.get_tensor("logits").data[:, 0].copy()


@dataclass
class HeldBlocks:
    """The blocks a session holds in the pool, apart from the session, so they can go back when it is dropped."""

    prefix: list[int] = field(default_factory=list)  # empty: the prefix is not cached
    rows: list[tuple[list[int], int]] = field(default_factory=list)  # per row: its blocks, its length

    def past_prefix(self, blocks: list[int]) -> list[int]:
        """A row's blocks that are not the prefix's."""
        return [block for block in blocks if block not in self.prefix]

    def drop_rows(self, pool: BlockPool) -> None:
        """Give back the blocks of the last round's answers (never the prefix's)."""
        for blocks, _ in self.rows:
            pool.give_back(self.past_prefix(blocks))
        self.rows = []

    def release(self, pool: BlockPool) -> None:
        """Give back every block."""
        self.drop_rows(pool)
        pool.give_back(self.prefix)
        self.prefix = []


class PagedSession:
    """One frame's prefix in the pool's blocks, and the blocks of the answers of its last round (a
    `session.LanguageSession`): row i is question i of the last round, or `rows[i]` of the last step.
    """

    def __init__(self, model: PagedLanguageModel, prefix: np.ndarray):
        self._model = model
        self._prefix = prefix[0]  # [P, hidden]
        self.prefix_len = len(self._prefix)
        self._held = HeldBlocks()
        weakref.finalize(self, self._held.release, model.pool).atexit = False

    @property
    def _pool(self) -> BlockPool:
        return self._model.pool

    @property
    def prefix_cached(self) -> bool:
        """Whether the prefix is in the pool (the next questions need not prefill it)."""
        return bool(self._held.prefix)

    @property
    def cached_bytes(self) -> int:
        return len(self._held.prefix) * self._pool.bytes_per_block

    def restart(self) -> None:
        """Drop the cache; the next questions prefill the prefix again, with the first of them."""
        self._take_over_cache()
        self._held.release(self._pool)

    def prefill_prefix(self) -> None:
        """Cache the prefix on its own, now (the first question would otherwise bring it along)."""
        self.restart()
        self._held.prefix = self._pool.take(self._pool.blocks_for(self.prefix_len))
        self._model.run([Sequence(self._prefix, 0, self._held.prefix, 0, [self.prefix_len - 1])])

    def prefill_questions(
        self,
        questions: list[np.ndarray],
        branches: list[tuple[int, np.ndarray]] = (),
        reduce: BranchReducer | None = None,
    ) -> tuple[np.ndarray, list]:
        """Prefill question suffixes (each [S_i, hidden]) after the prefix, and `branches` after their questions.

        Returns the questions' next-token logits [N, vocab] and each branch's logits [L, vocab] (position j
        predicts the token after branch token j); with `reduce`, `reduce(branch index, its logits)` instead,
        taken as each call's logits are read, so no more than one call's logits are held at once. A question's
        first branch rides along in the question's own sequence, past the end the row keeps; further branches
        follow after the question rows (`_score_branches`).
        """
        reduce = reduce or (lambda index, logits: logits)
        self._take_over_cache()
        self._held.drop_rows(self._pool)
        first_branch_of_row: dict[int, int] = {}  # question row -> its first branch, riding in its sequence
        for index, (row, _) in enumerate(branches):
            first_branch_of_row.setdefault(row, index)
        jobs = [Job(row, first_branch_of_row.get(row)) for row in range(len(questions))]
        sequences, results = [], []  # per job: its sequence; the logits after its question and its branch tokens
        if not self._held.prefix:
            first = self._with_prefix(*self._tokens(jobs[0], questions, branches))
            results += self._run_each([first])
            sequences.append(first)
        # only once the prefix's call has run: `_after_prefix` copies the prefix's last block
        later = [self._after_prefix(*self._tokens(job, questions, branches)) for job in jobs[len(sequences) :]]
        results += self._run_each(later)
        sequences += later
        for job, sequence in zip(jobs, sequences):
            self._held.rows.append((sequence.blocks, self.prefix_len + len(questions[job.row])))
        branch_scores = {
            job.branch: reduce(job.branch, result[1:]) for job, result in zip(jobs, results) if job.branch is not None
        }
        later_branches = [index for index, (row, _) in enumerate(branches) if first_branch_of_row[row] != index]
        branch_scores.update(self._score_branches(branches, later_branches, reduce))
        return np.stack([result[0] for result in results]), [branch_scores[i] for i in range(len(branches))]

    def _score_branches(self, branches, indices: list[int], reduce) -> dict[int, Any]:
        """{index: reduce(index, logits)} for `branches[index]`, each after its question's row, in calls of
        at most `BRANCHES_PER_CALL` sequences whose own blocks go back to the pool after each call."""
        scored = {}
        for start in range(0, len(indices), BRANCHES_PER_CALL):
            chunk = indices[start : start + BRANCHES_PER_CALL]
            placed = [self._after_row(*branches[index]) for index in chunk]
            logits = self._run_each([sequence for sequence, _ in placed])
            for (_, own), index, branch_logits in zip(placed, chunk, logits):
                self._pool.give_back(own)
                scored[index] = reduce(index, branch_logits)
        return scored

    def _after_row(self, row: int, tokens: np.ndarray) -> tuple[Sequence, list[int]]:
        """`tokens` after question `row`'s cached tokens, logits at each of them, and the blocks it owns: the
        row's full blocks are shared, its partly filled last block is copied (it may hold a rider's tokens
        past the row's end, which this sequence overwrites in its copy)."""
        blocks, length = self._held.rows[row]
        full = length // self._pool.block_size
        own = self._pool.take(self._pool.blocks_for(length + len(tokens)) - full)
        if length % self._pool.block_size:
            self._pool.copy(blocks[full], own[:1])
        return Sequence(tokens, length, blocks[:full] + own, length, list(range(len(tokens)))), own

    @staticmethod
    def _tokens(job: "Job", questions, branches) -> tuple[np.ndarray, list[int]]:
        """A job's tokens after the prefix (its question, then its branch if any) and where its logits are read."""
        question = questions[job.row]
        tokens = question if job.branch is None else np.concatenate([question, branches[job.branch][1]])
        return tokens, list(range(len(question) - 1, len(tokens)))

    def step(self, embeds: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One decode step for `rows` (indices into the last call's rows), embeds [len(rows), 1, hidden].

        Returns the next-token logits [len(rows), vocab]; afterwards row i is `rows[i]`.
        """
        kept = {int(row) for row in rows}
        for row, (blocks, _) in enumerate(self._held.rows):
            if row not in kept:
                self._pool.give_back(self._held.past_prefix(blocks))
        self._held.rows = [self._held.rows[row] for row in rows]
        sequences = []
        for index, (blocks, length) in enumerate(self._held.rows):
            if length == len(blocks) * self._pool.block_size:
                blocks.append(self._pool.take(1)[0])
            sequences.append(Sequence(embeds[index], length, blocks, length, [0]))
            self._held.rows[index] = (blocks, length + 1)
        return self._model.run(sequences)

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _take_over_cache(self) -> None:
        """Take the turn: the session before gives back its last round's rows; every prefix stays cached."""
        owner = self._model.cache_owner
        if owner is not self:
            if owner is not None:
                owner._held.drop_rows(self._pool)
            self._model.cache_owner = self

    def _with_prefix(self, tokens: np.ndarray, logits_at: list[int]) -> Sequence:
        """The prefix with `tokens` (the first question, and its riding branch) after it, as one sequence: the
        prefix's blocks, the first question's row continuing in the last of them."""
        blocks = self._pool.take(self._pool.blocks_for(self.prefix_len + len(tokens)))
        self._held.prefix = blocks[: self._pool.blocks_for(self.prefix_len)]
        return Sequence(np.concatenate([self._prefix, tokens]), 0, blocks, 0, [self.prefix_len + i for i in logits_at])

    def _run_each(self, sequences: list[Sequence]) -> list[np.ndarray]:
        """One call over `sequences` (none: no call); each sequence's logits [len(logits_at), vocab]."""
        if not sequences:
            return []
        logits = self._model.run(sequences)
        return np.split(logits, np.cumsum([len(s.logits_at) for s in sequences])[:-1])

    def _after_prefix(self, tokens: np.ndarray, logits_at: list[int]) -> Sequence:
        """A sequence of `tokens` after the cached prefix, in blocks of its own past the prefix's full ones."""
        full = self.prefix_len // self._pool.block_size
        own = self._pool.take(self._pool.blocks_for(self.prefix_len + len(tokens)) - full)
        if full < len(self._held.prefix):  # the prefix's partly filled last block: each sequence its own copy
            self._pool.copy(self._held.prefix[full], own[:1])
        return Sequence(tokens, self.prefix_len, self._held.prefix[:full] + own, self.prefix_len, logits_at)


def load_language_model(
    core: ov.Core, graph_path, device: str, inference_precision: str | None = None, **overrides
) -> LanguageModel:
    """The engine's language model: paged on the CPU, the stateful graph elsewhere or where it cannot be paged.

    Compiled with the engine's settings for `device` (`overrides` replace single compile properties, for
    measurements). The settings are chosen on the exported graph, whose KV cache state they look at. The
    plugin's paged attention accepts fewer combinations of inference and cache precision than its stateful
    attention (an f32 cache needs f32 inference), so a paged graph it refuses falls back to the stateful one.

    The paged graph is compiled without the model cache: OpenVINO 2026.4's CPU plugin exports it, but its
    import fails (the attention nodes lose their head sizes, runtime info the plugin requires), so every start
    would compile it again and rewrite the blob.
    """
    if device.startswith("CPU"):
        graph = core.read_model(graph_path)
        properties = {**compile_properties(device, inference_precision, graph), "CACHE_DIR": "", **overrides}
        if to_paged_attention(graph):
            with contextlib.suppress(RuntimeError):
                return PagedLanguageModel(core.compile_model(graph, device, properties))
    return StatefulLanguageModel.load(core, graph_path, device, inference_precision, **overrides)
