"""The engine: encode a frame once, then answer any number of questions about it.

    engine = Engine.load("models/llava-1.5-7b-int4")
    context = engine.encode(frame)                      # preprocess + vision encoder + prefix prefill
    answers = engine.answer(context, ["Is the door open?", "How many people are there?"])

`encode` runs the vision encoder and prefills the prompt prefix (system prompt, `USER:`, image tokens) into
the language model's KV cache; `answer` forks that cache into one row per question and decodes them as one
batch, so the image is never encoded or prefilled twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from ..errors import UserError
from .devices import DevicePlan, compile_properties, plan_devices
from .image_features import pack_anyres
from .language import LanguageSession
from .model_dir import ModelDir
from .preprocess import AnyresPreprocessor, ClipPreprocessor, ProcessorSettings
from .prompt import ChatTemplate
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Timings:
    """Milliseconds spent per stage. Question prefill and decode are shared by the questions of one batch."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefix_ms: float = 0.0
    question_prefill_ms: float = 0.0
    decode_ms: float = 0.0

    def as_dict(self) -> dict:
        return {"preprocess": self.preprocess_ms, "vision": self.vision_ms, "prefix": self.prefix_ms,
                "question_prefill": self.question_prefill_ms, "decode": self.decode_ms}


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    token_ids: list[int]
    timings: Timings


@dataclass
class FrameContext:
    """One encoded frame: its image embeddings and a language-model cache holding the shared prefix."""

    prefix_ids: np.ndarray  # prompt tokens before the image
    prefix_embeds: np.ndarray  # [1, P, hidden]: prompt embeddings with the image features spliced in
    image_tokens: int
    image_size: tuple[int, int]
    timings: Timings
    session: LanguageSession = field(repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


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

    def __init__(self, model: ModelDir, core: ov.Core, devices: DevicePlan, inference_precision: str | None = None,
                 system_prompt: str | None = None):
        self.model = model
        self.devices = devices
        self._core = core
        self.tokenizer = Tokenizer(core, model.graph("tokenizer"), model.graph("detokenizer"))
        self.template = ChatTemplate(model.chat_template, model.special_tokens, system_prompt)
        settings = ProcessorSettings.from_dict(model.processor)
        self.preprocess = AnyresPreprocessor(settings) if model.model_type == "llava_next" else ClipPreprocessor(settings)
        self._vision = self._compile_vision(inference_precision)
        self._embed = core.compile_model(model.graph("text_embeddings"), devices.language,
                                         compile_properties(devices.language, inference_precision))
        self._language = core.compile_model(model.graph("language"), devices.language,
                                            compile_properties(devices.language, inference_precision))
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "CPU", vision_device: str | None = None,
             language_device: str | None = None, cache_dir: str | Path | None = None,
             inference_precision: str | None = None, system_prompt: str | None = None) -> "Engine":
        """Open and compile an exported model. `cache_dir` keeps compiled blobs so later starts are fast."""
        model = ModelDir.open(model_dir)
        core = ov.Core()
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        devices = plan_devices(core, device, vision_device, language_device)
        try:
            return cls(model, core, devices, inference_precision, system_prompt)
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load model {model.path}: {first_line}") from None

    @property
    def name(self) -> str:
        return self.model.name

    def _compile_vision(self, inference_precision: str | None) -> ov.CompiledModel:
        graph = self._core.read_model(self.model.graph("vision"))
        if "NPU" in self.devices.vision:
            # The NPU compiles static shapes only: one tile at a time.
            side = self.preprocess(np.zeros((8, 8, 3), np.uint8)).pixel_values.shape[-1]
            graph.reshape({graph.inputs[0].get_any_name(): [1, 3, side, side]})
        return self._core.compile_model(graph, self.devices.vision,
                                        compile_properties(self.devices.vision, inference_precision))

    # -- encoding a frame -------------------------------------------------------------------------------

    def encode(self, frame_bgr: np.ndarray) -> FrameContext:
        """Preprocess, run the vision encoder, and prefill the shared prompt prefix for one frame."""
        if frame_bgr is None or frame_bgr.size == 0 or frame_bgr.ndim not in (2, 3):
            raise ValueError("empty or malformed frame")
        with self._lock:
            watch = Stopwatch()
            prepared = self.preprocess(frame_bgr)
            preprocess_ms = watch.lap()
            features = self._image_features(prepared.pixel_values, prepared.image_size)
            vision_ms = watch.lap()
            prefix_ids = self._prefix_ids()
            prefix_embeds = np.concatenate([self._embed_ids(prefix_ids[None]), features[None]], axis=1)
            session = LanguageSession(self._language)
            session.prefill_prefix(prefix_embeds)
            timings = Timings(preprocess_ms=preprocess_ms, vision_ms=vision_ms, prefix_ms=watch.lap())
        return FrameContext(prefix_ids=prefix_ids, prefix_embeds=prefix_embeds, image_tokens=len(features),
                            image_size=prepared.image_size, timings=timings, session=session)

    def _image_features(self, pixel_values: np.ndarray, image_size) -> np.ndarray:
        if "NPU" in self.devices.vision:
            tiles = [self._vision(tile[None])[0] for tile in pixel_values]
            features = np.concatenate(tiles, axis=0)
        else:
            features = self._vision(pixel_values)[0]
        if self.model.model_type == "llava_next":
            tile_px = pixel_values.shape[-1]
            return pack_anyres(features, image_size, self.preprocess.settings.grid_pinpoints, tile_px,
                               self.model.vision_grid, self.model.image_newline)
        return features[0]

    def _split_prompt(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the templated prompt before and after the image placeholder."""
        ids = self.tokenizer.encode(self.template.render(question))
        where = np.flatnonzero(ids == self.model.image_token_id)
        if len(where) != 1:
            raise UserError(f"the chat template of {self.model.path} does not place exactly one image token")
        return ids[:where[0]], ids[where[0] + 1:]

    def _prefix_ids(self) -> np.ndarray:
        return self._split_prompt("")[0]

    def _embed_ids(self, ids: np.ndarray) -> np.ndarray:
        return self._embed(np.asarray(ids, dtype=np.int64))[0]

    # -- answering ---------------------------------------------------------------------------------------

    def answer(self, context: FrameContext, questions: list[str], max_new_tokens: int | list[int] = 32,
               ignore_eos: bool = False) -> list[Answer]:
        """Greedy answers to `questions` about the frame in `context`, decoded as one batch.

        `max_new_tokens` may be one limit or one per question. With `ignore_eos` every answer runs to its
        limit (benchmarks use it for fixed lengths).
        """
        if not questions:
            return []
        if any(not q or not q.strip() for q in questions):
            raise UserError("a question is empty")
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(questions)
        suffixes = [self._question_suffix(context, q) for q in questions]
        with self._lock, context.lock:
            watch = Stopwatch()
            session = context.session
            if session.garbage > context.prefix_embeds.shape[1]:
                session.prefill_prefix(context.prefix_embeds)
            logits = session.prefill_questions(self._left_padded_embeds(suffixes), [len(s) for s in suffixes])
            prefill_ms = watch.lap()
            generated = self._decode(session, logits, limits, ignore_eos)
            decode_ms = watch.lap()
        timings = Timings(context.timings.preprocess_ms, context.timings.vision_ms, context.timings.prefix_ms,
                          prefill_ms, decode_ms)
        return [Answer(question=q, text=self.tokenizer.decode(ids), token_ids=ids, timings=timings)
                for q, ids in zip(questions, generated)]

    def _question_suffix(self, context: FrameContext, question: str) -> np.ndarray:
        prefix, suffix = self._split_prompt(question)
        if not np.array_equal(prefix, context.prefix_ids):
            raise UserError("the chat template puts question text before the image; "
                            "a shared frame prefix needs the image first")
        return suffix

    def _left_padded_embeds(self, suffixes: list[np.ndarray]) -> np.ndarray:
        width = max(len(s) for s in suffixes)
        ids = np.zeros((len(suffixes), width), dtype=np.int64)  # pads are masked out; any id will do
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix):] = suffix
        return self._embed_ids(ids)

    def _decode(self, session: LanguageSession, logits: np.ndarray, limits: list[int],
                ignore_eos: bool) -> list[list[int]]:
        """Greedy decoding; rows leave the batch when they emit a stop token or reach their limit."""
        stop = set() if ignore_eos else set(self.model.stop_token_ids)
        outputs: list[list[int]] = [[] for _ in limits]
        active = list(range(len(limits)))
        while active:
            next_ids = logits.argmax(axis=-1)
            keep = []
            for batch_row, question in enumerate(active):
                token = int(next_ids[batch_row])
                if token in stop:
                    continue
                outputs[question].append(token)
                if len(outputs[question]) < limits[question]:
                    keep.append(batch_row)
            if not keep:
                break
            active = [active[r] for r in keep]
            logits = session.step(self._embed_ids(next_ids[keep][:, None]), np.asarray(keep))
        return outputs
