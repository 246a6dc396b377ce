"""The engine: encode a frame once, then answer any number of questions about it.

    engine = Engine.load("models/llava-1.5-7b-int4")
    context = engine.encode(frame)                      # preprocess + vision encoder
    answers = engine.answer(context, [Prompt("Is the door open?", options=("yes", "no")),
                                      Prompt("How many people are there?", max_new_tokens=3, digits=True)])

`encode` runs the vision encoder and builds the prompt prefix (system prompt, `USER:`, image tokens); the
first `answer` prefills that prefix with its questions into the language model's KV cache, and later rounds
reuse the cached prefix. Questions decode as one batch, so the image is never encoded or prefilled twice.
On the CPU the language model runs with paged attention (`paged.py`), elsewhere as the exported stateful
graph (`language.py`); both give the same answers, and the engine reaches them only through the protocols
of `session.py`.

The paged language model cannot come from OpenVINO's compiled-model cache (see `load_language_model`), and
compiling it is the longest step of a start, with one core busy and the other mostly idle. So it compiles
on a thread of its own: `Engine.load` returns once the other submodels are ready, and the first frame is
encoded meanwhile. An error of that compile surfaces where the
language model is first needed, as the same one-line `UserError` that `Engine.load` raises.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from ..errors import UserError
from .constrained import (
    DigitVocabulary,
    Prompt,
    continuation,
    finite_confidence,
    log_softmax,
    option_probabilities,
    spelling_score,
    spellings,
)
from .devices import DevicePlan, compile_properties, plan_devices
from .image_features import pack_anyres
from .mapped_files import mapped_pages_dropped_during
from .model_dir import ModelDir
from .paged import load_language_model
from .preprocess import AnyresPreprocessor, ClipPreprocessor, ProcessorSettings
from .prompt import ChatTemplate
from .session import LanguageModel, LanguageSession
from .tokenizer import Tokenizer

OPTION_CACHE_ENTRIES = 1024
"""Options whose spellings' token ids are kept (keyed by question and option). Standing questions find
theirs on every frame; ad hoc questions come and go, and the least recently used entries go with them."""


@dataclass(frozen=True)
class Timings:
    """Milliseconds spent per stage. Question prefill and decode are shared by the questions of one batch.

    `prefix_ms` is set only when the prefix was prefilled on its own (`encode(..., prefill=True)`); otherwise
    the first round's `question_prefill_ms` covers the prefix too, prefilled in the same pass.
    """

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefix_ms: float = 0.0
    question_prefill_ms: float = 0.0
    decode_ms: float = 0.0

    def as_dict(self) -> dict:
        return {
            "preprocess": self.preprocess_ms,
            "vision": self.vision_ms,
            "prefix": self.prefix_ms,
            "question_prefill": self.question_prefill_ms,
            "decode": self.decode_ms,
        }


@dataclass(frozen=True)
class Answer:
    question: str
    text: str  # the generated text, or the chosen option
    token_ids: list[int]  # generated ids (without the stop token), or the chosen option's spelling
    timings: Timings
    confidence: float | None = None  # for option questions: the chosen option's probability among the options


@dataclass
class FrameContext:
    """One encoded frame: its prefix embeddings and the language-model session that caches them."""

    prefix_ids: np.ndarray  # prompt tokens before the image
    prefix_embeds: np.ndarray  # [1, P, hidden]: prompt embeddings with the image features spliced in
    image_tokens: int
    image_size: tuple[int, int]
    timings: Timings
    session: LanguageSession = field(repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        """The memory this context holds: its prefix embeddings and the prefix's own cache (`cached_bytes`)."""
        return self.prefix_embeds.nbytes + self.session.cached_bytes


def in_background(function, *args) -> concurrent.futures.Future:
    """Run `function(*args)` on a thread of its own, which ends with it; its result or exception in the future."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")
    future = executor.submit(function, *args)
    executor.shutdown(wait=False)
    return future


def load_error(model: ModelDir, exc: RuntimeError) -> UserError:
    """OpenVINO's error while loading `model`, as one line."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"cannot load model {model.path}: {first_line}")


class Stopwatch:
    def __init__(self):
        self._start = time.perf_counter()

    def lap(self) -> float:
        """Milliseconds since the last lap."""
        now = time.perf_counter()
        elapsed, self._start = (now - self._start) * 1000.0, now
        return elapsed


class Engine:
    """A loaded model: the compiled submodels, tokenizer, chat template and preprocessing."""

    def __init__(
        self,
        model: ModelDir,
        core: ov.Core,
        devices: DevicePlan,
        inference_precision: str | None = None,
        system_prompt: str | None = None,
        batch_views: bool = False,
    ):
        self.model = model
        self._batch_views = batch_views
        self.devices = devices
        self._core = core
        self.tokenizer = Tokenizer(core, model.graph("tokenizer"), model.graph("detokenizer"))
        self.template = ChatTemplate(model.chat_template, model.special_tokens, system_prompt)
        settings = ProcessorSettings.from_dict(model.processor)
        self.preprocess = (
            AnyresPreprocessor(settings) if model.model_type == "llava_next" else ClipPreprocessor(settings)
        )
        self._language_compiling = in_background(
            load_language_model, core, model.graph("language"), devices.language, inference_precision
        )
        self._vision = self._compile_vision(inference_precision)
        self._vision_takes_one_tile = self._vision.input(0).get_partial_shape()[0] == 1
        self._embed = core.compile_model(
            model.graph("text_embeddings"), devices.language, compile_properties(devices.language, inference_precision)
        )
        self._lock = threading.Lock()
        self._weights_still_mapped = {"vision", "language"}
        self._option_cache: collections.OrderedDict[tuple[str, str], tuple[tuple[int, ...], ...]] = (
            collections.OrderedDict()
        )

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str = "CPU",
        vision_device: str | None = None,
        language_device: str | None = None,
        cache_dir: str | Path | None = None,
        inference_precision: str | None = None,
        system_prompt: str | None = None,
        batch_views: bool = False,
    ) -> "Engine":
        """Open and compile an exported model. `cache_dir` keeps compiled blobs so later starts are fast;
        `batch_views` compiles the vision encoder for batches of views (`encode_views`), see
        `_vision_input_shape`."""
        model = ModelDir.open(model_dir)
        core = ov.Core()
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        devices = plan_devices(core, device, vision_device, language_device)
        try:
            return cls(model, core, devices, inference_precision, system_prompt, batch_views)
        except RuntimeError as exc:
            raise load_error(model, exc) from None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def _language(self) -> LanguageModel:
        """The language model; the first use waits for its compile to finish."""
        try:
            return self._language_compiling.result()
        except RuntimeError as exc:
            raise load_error(self.model, exc) from None

    def _compile_vision(self, inference_precision: str | None) -> ov.CompiledModel:
        """The vision encoder, compiled for the preprocessor's tiles where their shape is fixed."""
        graph = self._core.read_model(self.model.graph("vision"))
        shape = self._vision_input_shape()
        if shape is not None:
            graph.reshape({graph.inputs[0].get_any_name(): shape})
        # With static shapes the CPU plugin repacks the weights while compiling, not at the first inference.
        with mapped_pages_dropped_during(self._mapped_directories()):
            return self._core.compile_model(
                graph, self.devices.vision, compile_properties(self.devices.vision, inference_precision, graph)
            )

    def _vision_input_shape(self) -> list[int] | None:
        """The encoder's input shape to compile, or None to keep the export's dynamic one.

        Static shapes run faster on the CPU, and the NPU compiles nothing else: there, one tile at a time.
        Elsewhere the tile's height and width are fixed where the preprocessor's are. The batch is fixed at one
        tile too, unless the engine encodes several views at a time (`batch_views`) or LLaVA-NeXT's tile count
        follows each frame's shape: then it holds every tile of the views encoded together. An open batch costs
        a single view a few percent and saves more on several (docs/ARCHITECTURE.md, "Regions and views").
        """
        tile = self.preprocess.tile_shape
        on_npu = "NPU" in self.devices.vision
        if tile is None:
            if on_npu:
                raise UserError(
                    f"the vision encoder of {self.model.path} cannot run on the NPU: its preprocessor "
                    "sizes images by the frame's aspect ratio, and the NPU needs one fixed tile shape"
                )
            return None
        open_batch = not on_npu and (self._batch_views or self.model.model_type == "llava_next")
        return [-1 if open_batch else 1, 3, *tile]

    def _first_use(self, submodel: str) -> contextlib.AbstractContextManager:
        """Around a submodel's first inference: let go of its mapped files' pages as the device copies them.

        After that inference the device holds the weights in its own buffers (see `mapped_files`).
        """
        if submodel not in self._weights_still_mapped:
            return contextlib.nullcontext()
        self._weights_still_mapped.discard(submodel)
        return mapped_pages_dropped_during(self._mapped_directories())

    def _mapped_directories(self) -> list[Path]:
        """Where the files OpenVINO maps for this model are: the model and the compiled-model cache."""
        cache_dir = self._core.get_property("CACHE_DIR")
        return [self.model.path] + ([Path(cache_dir)] if cache_dir else [])

    # -- encoding a frame -------------------------------------------------------------------------------

    def encode(self, frame_bgr: np.ndarray, prefill: bool = False) -> FrameContext:
        """Preprocess and run the vision encoder for one frame: the shared prompt prefix of its questions.

        The prefix is prefilled with the first questions, in the same pass, unless `prefill` asks for it now
        (benchmarks time it on its own that way).
        """
        return self.encode_views([frame_bgr], prefill)[0]

    def encode_views(self, views: list[np.ndarray], prefill: bool = False) -> list[FrameContext]:
        """`encode` for several images at once (the views of one frame): their tiles go through the vision
        encoder as one batch where the device takes one (`_vision_batches`), and each view gets a context of
        its own. Their timings are the batch's: every context carries the whole preprocess and vision time.
        """
        for view in views:
            if view is None or view.size == 0 or view.ndim not in (2, 3):
                raise ValueError("empty or malformed frame")
        with self._lock:
            watch = Stopwatch()
            prepared = [self.preprocess(view) for view in views]
            preprocess_ms = watch.lap()
            with self._first_use("vision"):
                features = self._image_features(prepared)
            vision_ms = watch.lap()
            prefix_ids = self._prefix_ids()
            before_image = self._embed_ids(prefix_ids[None])
            contexts = []
            for view_prepared, view_features in zip(prepared, features):
                prefix_embeds = np.concatenate([before_image, view_features[None]], axis=1)
                session = self._language.session(prefix_embeds)
                prefix_ms = 0.0
                if prefill:
                    with self._first_use("language"):
                        session.prefill_prefix()
                    prefix_ms = watch.lap()
                timings = Timings(preprocess_ms=preprocess_ms, vision_ms=vision_ms, prefix_ms=prefix_ms)
                contexts.append(
                    FrameContext(
                        prefix_ids=prefix_ids,
                        prefix_embeds=prefix_embeds,
                        image_tokens=len(view_features),
                        image_size=view_prepared.image_size,
                        timings=timings,
                        session=session,
                    )
                )
        return contexts

    def _image_features(self, prepared: list) -> list[np.ndarray]:
        """The image features [tokens, hidden] of each preprocessed view, all views' tiles encoded together."""
        tiles = np.concatenate([view.pixel_values for view in prepared])
        features = np.concatenate([self._vision(batch)[0] for batch in self._vision_batches(tiles)])
        per_view = np.split(features, np.cumsum([len(view.pixel_values) for view in prepared])[:-1])
        if self.model.model_type != "llava_next":
            return [view_features[0] for view_features in per_view]
        return [
            pack_anyres(
                view_features,
                view.image_size,
                self.preprocess.settings.grid_pinpoints,
                tiles.shape[-1],
                self.model.vision_grid,
                self.model.image_newline,
            )
            for view, view_features in zip(prepared, per_view)
        ]

    def _vision_batches(self, tiles: np.ndarray) -> list[np.ndarray]:
        """`tiles` [N, 3, H, W] as the vision encoder takes them: all at once, or one by one where its batch is
        fixed at 1 (on the NPU)."""
        if self._vision_takes_one_tile:
            return [tile[None] for tile in tiles]
        return [tiles]

    def _split_prompt(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the templated prompt before and after the image placeholder."""
        ids = self.tokenizer.encode(self.template.render(question))
        where = np.flatnonzero(ids == self.model.image_token_id)
        if len(where) != 1:
            raise UserError(f"the chat template of {self.model.path} does not place exactly one image token")
        return ids[: where[0]], ids[where[0] + 1 :]

    def _prefix_ids(self) -> np.ndarray:
        return self._split_prompt("")[0]

    def _embed_ids(self, ids: np.ndarray) -> np.ndarray:
        return self._embed(np.asarray(ids, dtype=np.int64))[0]

    # -- answering ---------------------------------------------------------------------------------------

    def answer(self, context: FrameContext, prompts: list[Prompt]) -> list[Answer]:
        """Answers to `prompts` about the frame in `context`, prefilled and decoded as one batch, in order.

        Free answers are greedy, each up to its prompt's limit; option and digit prompts are constrained
        as `Prompt` says.
        """
        if not prompts:
            return []
        if any(not p.text or not p.text.strip() for p in prompts):
            raise UserError("a question is empty")
        suffixes = [self._question_suffix(context, p.text) for p in prompts]
        option_spellings = self._option_spellings(prompts)
        branches = self._branches(option_spellings)
        with self._lock, context.lock:
            watch = Stopwatch()
            session = context.session
            embedded = self._embed_each(suffixes + [np.asarray(ids) for _, ids in branches])
            branch_embeds = [(row, e) for (row, _), e in zip(branches, embedded[len(suffixes) :])]
            with self._first_use("language"):
                reduce = self._needed_log_probs(branches, option_spellings)
                logits, branch_log_probs = session.prefill_questions(embedded[: len(suffixes)], branch_embeds, reduce)
                prefill_ms = watch.lap()
                chosen = self._choose(prompts, option_spellings, logits, dict(zip(branches, branch_log_probs)))
                generated = self._decode(session, prompts, logits)
                decode_ms = watch.lap()
        timings = Timings(
            context.timings.preprocess_ms, context.timings.vision_ms, context.timings.prefix_ms, prefill_ms, decode_ms
        )
        answers = []
        for row, prompt in enumerate(prompts):
            if row in chosen:
                option, ids, confidence = chosen[row]
                answers.append(Answer(prompt.text, option, list(ids), timings, confidence))
            else:
                answers.append(Answer(prompt.text, self.tokenizer.decode(generated[row]), generated[row], timings))
        return answers

    def prompt_tokens(self, question: str) -> int:
        """How many tokens the model reads for `question` after the shared image prefix (the templated
        question and whatever the template puts after it)."""
        return len(self._split_prompt(question)[1])

    def option_tokens(self, question: str, option: str) -> int:
        """How many tokens the longest spelling of `option` takes as an answer to `question` (each is scored)."""
        return max(len(ids) for ids in self._option_ids(question, option))

    def _question_suffix(self, context: FrameContext, question: str) -> np.ndarray:
        prefix, suffix = self._split_prompt(question)
        if not np.array_equal(prefix, context.prefix_ids):
            raise UserError(
                "the chat template puts question text before the image; a shared frame prefix needs the image first"
            )
        return suffix

    def _embed_each(self, suffixes: list[np.ndarray]) -> list[np.ndarray]:
        """The embeddings of each id sequence ([len, hidden] each), from one call of the embedding model."""
        embedded = self._embed_ids(np.concatenate(suffixes)[None])[0]
        return np.split(embedded, np.cumsum([len(s) for s in suffixes])[:-1])

    # -- option questions --------------------------------------------------------------------------------

    def _option_spellings(self, prompts: list[Prompt]) -> dict[int, list[tuple[tuple[int, ...], ...]]]:
        """For option rows: {row: per option, the token ids of each way to spell it}."""
        return {
            row: [self._option_ids(p.text, option) for option in p.options]
            for row, p in enumerate(prompts)
            if p.options
        }

    @staticmethod
    def _branches(option_spellings: dict) -> list[tuple[int, tuple[int, ...]]]:
        """(row, ids) for every distinct spelling prefix that needs teacher forcing: all but the last token."""
        return sorted(
            {
                (row, ids[:-1])
                for row, options in option_spellings.items()
                for variants in options
                for ids in variants
                if len(ids) > 1
            }
        )

    @staticmethod
    def _needed_log_probs(branches: list[tuple[int, tuple[int, ...]]], option_spellings: dict):
        """How a branch's logits [L, vocab] are reduced as soon as they are read: to {(position, token):
        log-probability} for the tokens a spelling through it needs (its own next tokens, and at its last
        position the last token of each spelling it starts), not L x vocab floats per branch."""
        last_tokens = collections.defaultdict(set)
        for row, options in option_spellings.items():
            for ids in (ids for variants in options for ids in variants if len(ids) > 1):
                last_tokens[(row, ids[:-1])].add(ids[-1])

        def reduce(index: int, logits: np.ndarray) -> dict[tuple[int, int], float]:
            branch = branches[index]
            steps = log_softmax(logits)
            needed = [(j, branch[1][j + 1]) for j in range(len(branch[1]) - 1)]
            needed += [(len(branch[1]) - 1, token) for token in last_tokens[branch]]
            return {(j, token): float(steps[j, token]) for j, token in needed}

        return reduce

    @staticmethod
    def _choose(prompts: list[Prompt], option_spellings: dict, logits: np.ndarray, branch_log_probs: dict) -> dict:
        """For option rows: {row: (option, its best spelling's ids, probability or None)} from the model's
        distribution.

        A spelling scores the log-probability of its first token from the question's logits plus, for longer
        spellings, of each later token from its teacher-forced branch (`branch_log_probs[(row, ids[:-1])]`,
        reduced by `_needed_log_probs`).
        """
        chosen = {}
        for row, options in option_spellings.items():
            first = log_softmax(logits[row])
            scores = [
                [spelling_score(first, branch_log_probs.get((row, ids[:-1]), {}), ids) for ids in variants]
                for variants in options
            ]
            probabilities = option_probabilities(scores)
            best = int(probabilities.argmax())
            best_ids = options[best][int(np.argmax(scores[best]))]
            chosen[row] = (prompts[row].options[best], best_ids, finite_confidence(float(probabilities[best])))
        return chosen

    def _option_ids(self, question: str, option: str) -> tuple[tuple[int, ...], ...]:
        """The token ids of each way the model may spell `option` right after the prompt (cached)."""
        key = (question, option)
        if key not in self._option_cache:
            self._option_cache[key] = self._spell_option(question, option)
            if len(self._option_cache) > OPTION_CACHE_ENTRIES:
                self._option_cache.popitem(last=False)
        self._option_cache.move_to_end(key)
        return self._option_cache[key]

    def _spell_option(self, question: str, option: str) -> tuple[tuple[int, ...], ...]:
        rendered = self.template.render(question)
        prompt_ids = self.tokenizer.encode(rendered)
        variants = {
            continuation(prompt_ids, self.tokenizer.encode(rendered + spelling)) for spelling in spellings(option)
        }
        variants.discard(None)
        if not variants:
            raise UserError(f"option {option!r} cannot be tokenized as an answer to {question!r}")
        return tuple(sorted(variants))

    # -- free answers ------------------------------------------------------------------------------------

    @functools.cached_property
    def _digits(self) -> DigitVocabulary:
        vocabulary = self._language.compiled.output("logits").get_partial_shape()[2].get_length()
        return DigitVocabulary.from_token_texts([self.tokenizer.decode([token]) for token in range(vocabulary)])

    def _decode(self, session: LanguageSession, prompts: list[Prompt], logits: np.ndarray) -> dict[int, list[int]]:
        """Greedy decoding of the free rows; a row leaves the batch at a stop token (unless its prompt ignores
        them) or its limit.

        Row i of `logits` is question i, and so is row i of the session's batch.
        """
        stop_tokens = list(self.model.stop_token_ids)
        stops = [[] if p.ignore_eos else stop_tokens for p in prompts]
        active = [row for row, p in enumerate(prompts) if not p.options]
        outputs: dict[int, list[int]] = {row: [] for row in active}
        logits = logits[active]
        batch_rows = list(active)
        while active:
            keep = []
            next_ids = []
            for position, row in enumerate(active):
                token = self._next_token(logits[position], prompts[row], outputs[row], stops[row])
                next_ids.append(token)
                if token in stops[row]:
                    continue
                outputs[row].append(token)
                if len(outputs[row]) < prompts[row].max_new_tokens:
                    keep.append(position)
            if not keep:
                break
            tokens = np.asarray([next_ids[k] for k in keep], dtype=np.int64)
            logits = session.step(self._embed_ids(tokens[:, None]), np.asarray([batch_rows[k] for k in keep]))
            active = [active[k] for k in keep]
            batch_rows = list(range(len(active)))
        return outputs

    def _next_token(self, logits: np.ndarray, prompt: Prompt, so_far: list[int], stop: list[int]) -> int:
        if not prompt.digits:
            return int(logits.argmax())
        return int(np.where(self._digits.allowed(so_far, stop), logits, -np.inf).argmax())
