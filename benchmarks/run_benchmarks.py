"""Compare edge-agent's per-frame latency with the peer runtimes on one exported `bench` LLaVA model.

One run (about 10 minutes on 2 cores with --frames 5 --slow-frames 2, once the model is built; see README.md):
1. builds the random-weight `bench` checkpoint (CLIP ViT-L/14-336 tower, 0.4B Llama-style LM) into
   .cache/bench/ once, and exports it with an INT4 language model and an INT8 vision encoder;
2. times edge-agent's stages, memory and start-up (`edge-agent bench --json`), then measures the median
   seconds per new 640x480 frame for 1, 4 and 8 questions x 16 new tokens (end-of-sequence ignored) with
   edge-agent and with each peer side by side: every path is loaded in its own child process, so none
   inherits another's threads, caches or memory, and the paths answer in turn, frame by frame, so that a
   neighbour on a shared machine slows them alike:
   (a) OpenVINO GenAI `VLMPipeline.generate`, one call per question (its documented use);
   (b) the same with a `ChatHistory` anchor holding the frame, so later questions skip the vision encoder;
   (c) optimum-intel `OVModelForVisualCausalLM.generate`, one call per question;
   (d) transformers PyTorch FP32 `generate`, one call per question: slow, so fewer frames and no 8-question run;
3. puts decode against the memory-bandwidth roofline (weight and KV-cache bytes read per step over a measured
   copy bandwidth) and prefill against a measured OpenVINO matmul peak;
4. profiles decode steps (`decode_profile.py`): step time by answer rows and prefix length, sampled CPU time;
5. writes benchmarks/RESULTS.md and benchmarks/latency.png; the raw numbers stay in .cache/bench/results.json
   so `--report-only` can re-render them.

Needs the `export` extra, openvino-genai and matplotlib. Never run by the tests or CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import decode_profile  # noqa: E402  (benchmarks/, beside this script)
import pass_profile  # noqa: E402

from edge_agent.devtools.bench import files_mib, peak_rss_mib, standing_questions, synthetic_frame  # noqa: E402

CACHE = REPO / ".cache" / "bench"
BENCH_PRESETS = ("bench", "llava-1.5-7b", "llava-next-mistral-7b", "llava-interleave-qwen-0.5b")
"""The `edge_agent.devtools.testmodels` presets measured: `bench`, and the deployed models' attention layouts."""
QUESTION_COUNTS = (1, 4, 8)
NEW_TOKENS = 16
TARGET_QUESTIONS = 4
WARMUP_SEED = 1000
SETTLE_S = 0.1
"""Pause before each timed frame, so that the worker threads of the path that ran before, which may spin for
a moment after their work, are asleep."""
CHILD_TIMEOUT_S = 3 * 3600
CALIBRATED_SUFFIX = "-calibrated-vision"
CALIBRATION_SEED = 5000
CALIBRATION_FRAMES = 64
VERSIONED = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "transformers", "torch", "numpy")

PASS_PROFILE_VARIANTS = {
    "paged (the engine)": ("paged", {}),
    "stateful": ("stateful", {}),
    "paged, u8 KV cache": ("paged", {"KV_CACHE_PRECISION": "u8"}),
}
"""The language model variants `pass_profile` compares per model: the engine's two paths and the cache lever."""

AskAll = Callable[[np.ndarray, list], None]
"""Answers every question about one BGR frame the way one runtime would."""


# -- the paths compared ---------------------------------------------------------------------------------


def rgb(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frame[..., ::-1])


def edge_agent_batched(exported: Path) -> AskAll:
    """What `edge-agent bench` times per frame: encode once, then every question in one batch."""
    from edge_agent.engine import Engine, Prompt

    engine = Engine.load(exported, cache_dir=CACHE / "compiled")

    def ask_all(frame, questions):
        engine.answer(engine.encode(frame), [Prompt(question, NEW_TOKENS, ignore_eos=True) for question in questions])

    return ask_all


def load_genai(exported: Path, **properties):
    import openvino_genai as genai

    pipe = genai.VLMPipeline(str(exported), "CPU", **properties)
    return pipe, genai.GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)


def genai_per_question(exported: Path) -> AskAll:
    import openvino as ov

    pipe, config = load_genai(exported)

    def ask_all(frame, questions):
        image = ov.Tensor(rgb(frame))
        for question in questions:
            pipe.generate(question, images=[image], generation_config=config)

    return ask_all


def genai_anchored(exported: Path, **properties) -> AskAll:
    """GenAI keeps an image's encoding while some ChatHistory that used it is alive: the first question's
    history anchors the frame, and later questions with the same image skip the vision encoder."""
    import openvino as ov
    import openvino_genai as genai

    pipe, config = load_genai(exported, **properties)

    def ask_all(frame, questions):
        image = ov.Tensor(rgb(frame))
        anchor = genai.ChatHistory([{"role": "user", "content": questions[0]}])
        pipe.generate(anchor, images=[image], generation_config=config)
        for question in questions[1:]:
            history = genai.ChatHistory([{"role": "user", "content": question}])
            pipe.generate(history, images=[image], generation_config=config)

    return ask_all


def genai_anchored_edge_settings(exported: Path) -> AskAll:
    """(b) given the compile settings edge-agent picks for this CPU (`edge_agent.engine.devices.compile_properties`
    for the language model): int8 activations in groups as large as the weights allow, and a bf16 KV cache
    where the CPU computes in bf16."""
    import openvino as ov

    from edge_agent.engine.devices import compile_properties

    language = ov.Core().read_model(exported / "openvino_language_model.xml")
    return genai_anchored(exported, **compile_properties("CPU", None, language))


def prefix_caching_scheduler():
    """GenAI's continuous-batching scheduler with prefix caching on: a prompt whose image and text begin like an
    earlier one's reuses that one's cached KV blocks instead of prefilling them again."""
    import openvino_genai as genai

    scheduler = genai.SchedulerConfig()
    scheduler.enable_prefix_caching = True
    return scheduler


def genai_prefix_cached(exported: Path) -> AskAll:
    """(e) `VLMPipeline` given a `scheduler_config`, which selects its continuous-batching backend, with prefix
    caching: each question is a call of its own, and the frame's prefix (image and all) is cached by the
    first and hit by the others; the vision encoder still runs on every call."""
    import openvino as ov

    pipe, config = load_genai(exported, scheduler_config=prefix_caching_scheduler())

    def ask_all(frame, questions):
        image = ov.Tensor(rgb(frame))
        for question in questions:
            pipe.generate(question, images=[image], generation_config=config)

    return ask_all


def genai_batched(exported: Path) -> AskAll:
    """(f) `ContinuousBatchingPipeline` with prefix caching: all of a frame's questions in one `generate` call,
    the image repeated for each, so the scheduler prefills and decodes them together."""
    import openvino as ov
    import openvino_genai as genai

    pipe = genai.ContinuousBatchingPipeline(str(exported), prefix_caching_scheduler(), "CPU")
    config = genai.GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def ask_all(frame, questions):
        image = ov.Tensor(rgb(frame))
        pipe.generate(list(questions), images=[[image]] * len(questions), generation_config=[config] * len(questions))

    return ask_all


def optimum_per_question(exported: Path) -> AskAll:
    from optimum.intel import OVModelForVisualCausalLM
    from transformers import AutoProcessor

    model = OVModelForVisualCausalLM.from_pretrained(exported, device="CPU")
    return hf_generate_per_question(model, AutoProcessor.from_pretrained(exported))


def transformers_fp32(checkpoint: Path) -> AskAll:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return hf_generate_per_question(model, AutoProcessor.from_pretrained(checkpoint))


def hf_generate_per_question(model, processor) -> AskAll:
    """The Hugging Face idiom: chat template, processor, then `generate` once per question."""
    from PIL import Image

    def ask_all(frame, questions):
        image = Image.fromarray(rgb(frame))
        for question in questions:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    return ask_all


@dataclass(frozen=True)
class Peer:
    """One runtime compared side by side (edge-agent itself is one too)."""

    label: str
    """How RESULTS.md names it."""
    load: Callable[[Path], AskAll]
    """Loads the model (from the checkpoint or the export) and returns how it answers a frame's questions."""
    uses_checkpoint: bool = False
    """True when it runs the Hugging Face checkpoint instead of the OpenVINO export."""
    slow: bool = False
    """Measured on `--slow-frames` frames and without the 8-question configuration."""
    genai: bool = False
    """An OpenVINO GenAI path a user would pick: the strongest of them sets the 4-question target."""
    target: bool = True
    """Counted in the targets (the settings-only variant (b') is shown, not targeted)."""


OURS = Peer("**edge-agent** (encode once, questions batched)", edge_agent_batched)
PEERS = {
    "genai": Peer("(a) OpenVINO GenAI VLMPipeline.generate, per question", genai_per_question, genai=True),
    "genai_anchor": Peer("(b) OpenVINO GenAI with a ChatHistory anchor", genai_anchored, genai=True),
    "genai_anchor_tuned": Peer(
        "(b') GenAI with a ChatHistory anchor and edge-agent's CPU settings, not a target",
        genai_anchored_edge_settings,
        target=False,
    ),
    "genai_prefix_cache": Peer(
        "(e) GenAI VLMPipeline, continuous batching with prefix caching, per question", genai_prefix_cached, genai=True
    ),
    "genai_batched": Peer(
        "(f) GenAI ContinuousBatchingPipeline with prefix caching, a frame's questions in one call",
        genai_batched,
        genai=True,
    ),
    "optimum": Peer("(c) optimum-intel OVModelForVisualCausalLM.generate, per question", optimum_per_question),
    "transformers": Peer(
        "(d) transformers PyTorch FP32 generate, per question", transformers_fp32, uses_checkpoint=True, slow=True
    ),
}


# -- running every path in its own process -------------------------------------------------------------


def seconds(ask_all: AskAll, frame: np.ndarray, questions: list) -> float:
    started = time.perf_counter()
    ask_all(frame, questions)
    return time.perf_counter() - started


REPLY = "@@bench-reply "
"""Marks the child's protocol lines on its stdout, which the libraries it loads may print to as well."""


def serve(path: Peer, model: Path) -> None:
    """Child process: load one path, then time one frame per request line from stdin until it closes."""
    started = time.perf_counter()
    ask_all = path.load(model)
    reply({"load_s": time.perf_counter() - started})
    for line in sys.stdin:
        request = json.loads(line)
        reply({"seconds": seconds(ask_all, synthetic_frame(request["seed"]), standing_questions(request["count"]))})
    reply({"peak_rss_mib": peak_rss_mib()})


def reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


def run_child(command: list[str]) -> dict:
    """Run a measuring child process and parse the JSON object it prints last."""
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(exported: Path, questions: int, frames: int, yes_no: bool = False) -> dict:
    return run_child(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "bench",
            "--model",
            str(exported),
            "--questions",
            str(questions),
            "--new-tokens",
            str(NEW_TOKENS),
            "--frames",
            str(frames),
            "--cache-dir",
            str(CACHE / "compiled"),
            "--json",
            *(["--yes-no"] if yes_no else []),
        ]
    )


@dataclass
class Contender:
    """One path loaded in its child process (`serve`), timing frames on request."""

    name: str
    model: Path
    counts: tuple[int, ...]
    frames: int
    seconds: dict = field(default_factory=dict)  # question count -> seconds of each measured frame
    load_s: float = field(init=False, default=0.0)
    _child: subprocess.Popen = field(init=False, repr=False)
    _log: IO[str] = field(init=False, repr=False)

    def start(self) -> None:
        self._log = (CACHE / f"{self.name}.log").open("w")
        self._child = subprocess.Popen(
            [sys.executable, __file__, "--serve", self.name, "--model", str(self.model)],
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        self.load_s = self._reply()["load_s"]

    def time_frame(self, count: int, seed: int) -> float:
        time.sleep(SETTLE_S)
        self._child.stdin.write(json.dumps({"count": count, "seed": seed}) + "\n")
        self._child.stdin.flush()
        return self._reply()["seconds"]

    def finish(self) -> dict:
        """Close the child; what it measured, in the shape RESULTS.md renders."""
        self._child.stdin.close()
        peak = self._reply()["peak_rss_mib"]
        self._child.wait(timeout=60)
        self._log.close()
        frame_s = {count: statistics.median(times) for count, times in self.seconds.items()}
        return {
            "load_s": self.load_s,
            "frame_s": frame_s,
            "frames": self.frames,
            "peak_rss_mib": peak,
            "each_frame_s": self.seconds,
        }

    def _reply(self) -> dict:
        for line in self._child.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise RuntimeError(f"{self.name} stopped: see {self._log.name}")


def measure_side_by_side(contenders: list[Contender], question_counts: tuple[int, ...]) -> None:
    """Every contender loaded, then for each question count: one warm-up frame each, then the frames in turn.

    The order rotates from frame to frame, so no path always runs right after the same other one.
    """
    for contender in contenders:
        log(f"loading {contender.name}")
        contender.start()
    for count in question_counts:
        taking_part = [c for c in contenders if count in c.counts]
        log(f"{count} questions: {', '.join(c.name for c in taking_part)}")
        for contender in taking_part:
            contender.time_frame(count, WARMUP_SEED)
        for seed in range(max(c.frames for c in taking_part)):
            turn = seed % len(taking_part)
            for contender in taking_part[turn:] + taking_part[:turn]:
                if seed < contender.frames:
                    contender.seconds.setdefault(count, []).append(contender.time_frame(count, seed))


def contenders(args, checkpoint: Path, exported: Path) -> list[Contender]:
    found = [Contender("edge_agent", exported, args.counts, args.frames)]
    for name, peer in PEERS.items():
        if name not in args.skip:
            counts = tuple(c for c in args.counts if c <= TARGET_QUESTIONS) if peer.slow else args.counts
            found.append(
                Contender(
                    name,
                    checkpoint if peer.uses_checkpoint else exported,
                    counts,
                    args.slow_frames if peer.slow else args.frames,
                )
            )
    return found


def measure_all(args, checkpoint: Path, exported: Path) -> dict:
    """Everything RESULTS.md shows about one model (a preset, or `--checkpoint`/`--exported`)."""
    results = {
        "started": now(),
        "load_before": load_average(),
        "machine": machine(),
        "model": exported.name,
        "text_config": json.loads((exported / "config.json").read_text())["text_config"],
        "model_files_mib": files_mib(exported),
        "ours": {},
    }
    for count in args.counts:
        log(f"edge-agent bench, {count} questions")
        results["ours"][count] = run_ours(exported, count, args.frames)
    log("edge-agent bench, 4 yes/no questions")
    results["ours_yes_no"] = run_ours(exported, TARGET_QUESTIONS, args.frames, yes_no=True)
    side_by_side = contenders(args, checkpoint, exported)
    measure_side_by_side(side_by_side, args.counts)
    measured = {contender.name: contender.finish() for contender in side_by_side}
    results["ours_side_by_side"] = measured.pop("edge_agent")
    results["peers"] = measured
    log("roofline: copy bandwidth and matmul peak")
    results["roofline"] = roofline(exported, results["ours"][TARGET_QUESTIONS])
    log("decode profile: steps by answer rows, and where the CPU is")
    prefix_tokens = results["ours"][TARGET_QUESTIONS]["prefix_tokens"]
    results["decode_profile"] = decode_profile.measure(exported, prefix_tokens)
    log("questions' pass and decode step by node type: paged, stateful, u8 KV cache")
    results["pass_profile"] = pass_profile.measure(exported, prefix_tokens, PASS_PROFILE_VARIANTS)
    results["load_after"] = load_average()
    results["finished"] = now()
    return results


# -- the roofline -----------------------------------------------------------------------------------------


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Best GB/s of copying a large array with one thread per core (bytes read plus bytes written)."""
    source = np.ones(megabytes * 2**20 // 8)
    target = np.empty_like(source)
    pairs = list(zip(np.array_split(target, os.cpu_count()), np.array_split(source, os.cpu_count())))
    return 2 * source.nbytes / best_seconds(lambda pair: np.copyto(*pair), pairs, repeats) / 1e9


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Best GB/s of reading a large array with one thread per core (summing it): what a decode step does with
    its weights. Below the copy's figure on the machines measured, which counts the bytes written too."""
    source = np.ones(megabytes * 2**20 // 8)
    return source.nbytes / best_seconds(np.sum, np.array_split(source, os.cpu_count()), repeats) / 1e9


def best_seconds(work: Callable, parts: list, repeats: int) -> float:
    """The shortest of `repeats` runs of `work` over every part at once, one thread per part."""
    best = float("inf")
    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(work, parts))
            best = min(best, time.perf_counter() - started)
    return best


def matmul_gflops(m: int, k: int, n: int, int8: bool = False, repeats: int = 10) -> float:
    """Best GFLOP/s of an [m,k] x [k,n] OpenVINO MatMul on the CPU at its default float precision (the engine's)
    or, with `int8`, with both operands quantized to 8 bits (FakeQuantize, as in a calibrated int8 model)."""
    import openvino as ov
    import openvino.opset13 as ops

    activations = ops.parameter([m, k], ov.Type.f32)
    weights = ops.constant(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32))
    left, right = activations, weights
    if int8:
        low, high = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        left = ops.fake_quantize(activations, low, high, low, high, 256)
        right = ops.fake_quantize(weights, low, high, low, high, 255)
    compiled = ov.Core().compile_model(
        ov.Model([ops.matmul(left, right, False, False)], [activations]), "CPU", {"PERFORMANCE_HINT": "LATENCY"}
    )
    request = compiled.create_infer_request()
    data = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        request.infer([data])
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best / 1e9


def roofline(exported: Path, ours: dict) -> dict:
    """Decode against memory bandwidth, prefix prefill and vision against the matmul peak of the arithmetic
    they run in (int8 where the engine gives them int8 activations), for 4 questions."""
    import openvino as ov

    from edge_agent.engine.devices import compile_properties
    from edge_agent.engine.int8_activations import activation_group

    config = json.loads((exported / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    prefix = ours["prefix_tokens"]
    bandwidth, read_bandwidth = copy_bandwidth_gbs(), read_bandwidth_gbs()
    shapes = ((prefix, text["hidden_size"], text["intermediate_size"]), (2048, 2048, 2048))
    peak = max(matmul_gflops(*shape) for shape in shapes)
    int8_peak = max(matmul_gflops(*shape, int8=True) for shape in shapes)
    core = ov.Core()
    graphs = {
        submodel: core.read_model(exported / f"openvino_{submodel}.xml")
        for submodel in ("language_model", "vision_embeddings_model")
    }
    int8_activations = {submodel: activation_group(graph) is not None for submodel, graph in graphs.items()}
    kv_precision = compile_properties("CPU", None, graphs["language_model"]).get("KV_CACHE_PRECISION", "u8")
    step_bytes = decode_step_bytes(exported, text, prefix, kv_precision)
    step_ms = ours["decode"]["step_ms"]
    return {
        "copy_bandwidth_gbs": bandwidth,
        "read_bandwidth_gbs": read_bandwidth,
        "matmul_peak_gflops": peak,
        "int8_matmul_peak_gops": int8_peak,
        "float_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string(),
        "decode_step_bytes": step_bytes,
        "decode_step_ms": step_ms,
        "kv_cache_precision": kv_precision,
        "decode_roofline_ms": step_bytes / bandwidth / 1e6,
        "prefix_gflop": lm_prefill_flops(text, prefix) / 1e9,
        "prefix_ms": ours["stages_ms"]["prefix"],
        "prefix_int8": int8_activations["language_model"],
        "vision_gflop": vision_encoder_flops(config, vision, text) / 1e9,
        "vision_ms": ours["stages_ms"]["vision"],
        "vision_int8": int8_activations["vision_embeddings_model"],
    }


def decode_step_bytes(exported: Path, text: dict, prefix: int, kv_precision: str) -> float:
    """Bytes one decode step of 4 answers reads: every language-model weight once, plus the KV cache once.

    The KV cache holds 1 byte per value in the CPU plugin's default u8 (its scales are negligible), 2 in
    bf16, 4 in f32 (`edge_agent.engine.kv_cache`). The answers share the prefix's keys and values, counted once; each
    adds its question (about 16 tokens) and, on average, half of its answer.
    """
    weights = (exported / "openvino_language_model.bin").stat().st_size
    value_bytes = {"u8": 1, "bf16": 2, "f32": 4}[kv_precision]
    kv_per_token = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim(text) * value_bytes
    return weights + kv_per_token * (prefix + TARGET_QUESTIONS * (16 + NEW_TOKENS / 2))


def head_dim(text: dict) -> int:
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def lm_prefill_flops(text: dict, tokens: int) -> float:
    """Multiply-adds x2 of a pass over `tokens` as the engine runs it (`edge_agent.engine.language`): every
    layer up to the last one's attention for every token, causally; the last layer's output projection and
    MLP, and the LM head, for the last token only."""
    hidden, heads, kv_heads = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    dim = head_dim(text)
    projections = hidden * dim * (heads + 2 * kv_heads)  # q, k, v
    after_attention = hidden * dim * heads + 3 * hidden * text["intermediate_size"]  # o, then the MLP
    layers = text["num_hidden_layers"]
    every_token = 2 * tokens * (layers * projections + (layers - 1) * after_attention)
    last_token = 2 * (after_attention + hidden * text["vocab_size"])
    attention = 2 * layers * heads * dim * tokens * tokens  # QK^T and AV, causal half
    return every_token + last_token + attention


def vision_encoder_flops(config: dict, vision: dict, text: dict) -> float:
    """Multiply-adds x2 of the CLIP tower up to the selected feature layer plus the 2-layer projector."""
    hidden, patch = vision["hidden_size"], vision["patch_size"]
    patches = (vision["image_size"] // patch) ** 2
    tokens = patches + 1
    layers = vision["num_hidden_layers"] + 1 + config.get("vision_feature_layer", -2)
    per_layer = (
        2 * tokens * (4 * hidden * hidden + 2 * hidden * vision["intermediate_size"]) + 4 * tokens * tokens * hidden
    )
    embed = 2 * patches * 3 * patch * patch * hidden
    projector = 2 * patches * (hidden * text["hidden_size"] + text["hidden_size"] ** 2)
    return layers * per_layer + embed + projector


# -- the machine --------------------------------------------------------------------------------------------


def machine() -> dict:
    from edge_agent.engine.int8_activations import host_cpu_flags

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    flags = host_cpu_flags()
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": " ".join(
            f
            for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
            if f in flags
        ),
        "memory_gib": int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20,
        "python": platform.python_version(),
        "versions": {package: importlib.metadata.version(package) for package in VERSIONED},
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the report -------------------------------------------------------------------------------------------


def ours_frame_s(results: dict, count: int) -> float:
    return results["ours_side_by_side"]["frame_s"][str(count)]


ANALYSIS_START = "<!-- analysis: written by hand, kept when the report is re-rendered -->"
ANALYSIS_END = "<!-- /analysis -->"
QUANTIZATION_HEADING = "## Quantization recipes"


def write_report(models: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot(models, out / "latency.png")
    report = out / "RESULTS.md"
    report.write_text(render(models, kept_analysis(report)) + kept_quantization_section(report))


def kept_quantization_section(report: Path) -> str:
    """The `## Quantization recipes` section that `benchmarks/quantization.py` appends: a run of its own."""
    text = report.read_text() if report.is_file() else ""
    return "\n" + text[text.index(QUANTIZATION_HEADING) :] if QUANTIZATION_HEADING in text else ""


def kept_analysis(report: Path) -> str:
    """The hand-written explanations of the previous RESULTS.md: numbers are generated, reasons are not."""
    text = report.read_text() if report.is_file() else ""
    if ANALYSIS_START not in text or ANALYSIS_END not in text:
        return "No analysis written yet for these numbers."
    return text[text.index(ANALYSIS_START) + len(ANALYSIS_START) : text.index(ANALYSIS_END)].strip()


def render(models: dict, analysis: str) -> str:
    runs = list(models.values())
    started, finished = min(r["started"] for r in runs), max(r["finished"] for r in runs)
    sections = [
        "# Benchmark results\n\nGenerated by `python benchmarks/run_benchmarks.py` "
        f"({started} to {finished}); see README.md for what is measured and how.\n",
        machine_section(models),
        summary_section(models),
        f"## Why targets are missed\n\n{ANALYSIS_START}\n{analysis}\n{ANALYSIS_END}\n",
        *(model_section(name, results) for name, results in models.items()),
        "![seconds per new frame](latency.png)\n",
    ]
    return "\n".join(sections)


def model_section(name: str, results: dict) -> str:
    """Everything measured on one model, under a heading of its own."""
    parts = [
        latency_section(results),
        targets_section(results),
        profile_section(results),
        roofline_section(results),
        decode_profile.section(results["decode_profile"]),
        pass_profile_section(results),
        startup_section(results),
    ]
    body = "\n".join("#" + line if line.startswith("## ") else line for part in parts for line in part.split("\n"))
    return f"## Model `{name}`\n\n{model_line(results)}\n\n{body}"


def model_line(results: dict) -> str:
    text = results.get("text_config")
    layout = (
        ""
        if text is None
        else f"; language model: {text['num_hidden_layers']} layers, {text['num_attention_heads']} query heads, "
        f"{text['num_key_value_heads']} key/value heads, head size {head_dim(text)}, width {text['hidden_size']}, "
        f"MLP {text['intermediate_size']}"
    )
    return (
        f"`{results['model']}`, {results['model_files_mib']:.0f} MiB of files (INT4 language model, INT8 vision "
        f"encoder: CLIP ViT-L/14-336){layout}. Load average before: {results['load_before']}, after: "
        f"{results['load_after']} ({results['started']} to {results['finished']})."
    )


def machine_section(models: dict) -> str:
    first = min(models.values(), key=lambda results: results["started"])
    m = first["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (
        f"## Machine\n\n- CPU: {m['cpu']}, {m['cores']} cores visible ({m['isa']}), {m['memory_gib']:.0f} GiB RAM\n"
        f"- Python {m['python']}; {versions}\n"
        f"- Load average (1, 5, 15 min) when the first model's run started: {first['load_before']}. "
        f"{load_remark(first['load_before'])}\n"
        "- Models: random-weight LLaVAs (`edge-agent model build-test --preset NAME`), each section below names "
        f"its layout; synthetic 640x480 frames; answers of exactly {NEW_TOKENS} tokens (end-of-sequence "
        "ignored); greedy.\n"
    )


def summary_section(models: dict) -> str:
    """Every target of every model, met or missed, in one table."""
    names = list(models)
    by_model = {name: {target.name: target for target in targets(results)} for name, results in models.items()}
    target_names = list(dict.fromkeys(t for found in by_model.values() for t in found))
    rows = ["| target | " + " | ".join(f"`{name}`" for name in names) + " |", "|" + " --- |" * (len(names) + 1)]
    for target_name in target_names:
        cells = [by_model[name][target_name].cell() if target_name in by_model[name] else "-" for name in names]
        rows.append(f"| {target_name} | " + " | ".join(cells) + " |")
    return "## Targets, per model\n\n" + "\n".join(rows) + "\n"


def load_remark(load_before: str) -> str:
    """Whether other jobs shared the cores when the run started (a load of 1 or more on 2 cores)."""
    if float(load_before.split()[0]) < 1.0:
        return "The machine was otherwise idle; the paths answered in turn, one frame at a time."
    return (
        "Something else had been running (the load average counts the last minutes, so a benchmark run "
        "just before counts too): absolute times may be inflated; the ratios compare paths measured in "
        "the same run."
    )


def measured_counts(results: dict) -> list[int]:
    """The question counts a model was measured with (`--counts`)."""
    return sorted(results["ours"])


def latency_section(results: dict) -> str:
    counts = measured_counts(results)
    header = "| path | " + " | ".join(f"{c} q: s/frame (ours faster by)" for c in counts) + " | frames |"
    rows = [header, "|" + " --- |" * (len(counts) + 2)]
    rows.append(
        f"| {OURS.label} | "
        + " | ".join(f"**{ours_frame_s(results, c):.2f}**" for c in counts)
        + f" | {results['ours_side_by_side']['frames']} |"
    )
    for name, measured in results["peers"].items():
        cells = []
        for count in counts:
            value = measured["frame_s"].get(str(count))
            cells.append("not run" if value is None else f"{value:.2f} ({value / ours_frame_s(results, count):.1f}x)")
        rows.append(f"| {PEERS[name].label} | " + " | ".join(cells) + f" | {measured['frames']} |")
    unchanged = results["ours"][TARGET_QUESTIONS]["unchanged_frame_ms"] / 1000
    rows.append(
        "| unchanged scene (edge-agent: scene gate only) | "
        + " | ".join(f"{unchanged:.5f}" for _ in counts)
        + " | 200 calls |"
    )
    return (
        "## Seconds per new frame (median), questions x 16 tokens\n\n" + "\n".join(rows) + "\n\n"
        "Each path runs in its own process. All of them are loaded side by side and answer in turn, frame by "
        "frame (the order rotating), after one warm-up frame per question count, so that a neighbour on the "
        "machine slows them alike. PyTorch FP32 is slow, so it runs on fewer frames and not with 8 "
        "questions. The stage timings below come from separate `edge-agent bench` runs before.\n"
    )


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    bound: float
    higher_is_better: bool
    unit: str = "x"
    against: str = ""
    """The peer a ratio is taken against, where the target picks it per model."""

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    @property
    def verdict(self) -> str:
        return "met" if self.met else f"missed by {abs(self.value - self.bound) / self.bound:.0%}"

    def row(self) -> str:
        relation = ">=" if self.higher_is_better else "<="
        name = f"{self.name}, {self.against}" if self.against else self.name
        return f"| {name} | {relation} {self.bound:g}{self.unit} | {self.value:.2f}{self.unit} | {self.verdict} |"

    def cell(self) -> str:
        against = f" vs {self.against}" if self.against else ""
        return f"{self.value:.2f}{self.unit}{against}: {self.verdict}"


def peer_ratios(results: dict, count: int, which: Callable[[Peer], bool]) -> dict[str, float]:
    """{peer: its seconds per frame over edge-agent's} at `count` questions, for the peers `which` picks."""
    ratios = {}
    for name, measured in results["peers"].items():
        peer_s = measured["frame_s"].get(str(count))
        if peer_s is not None and which(PEERS[name]):
            ratios[name] = peer_s / ours_frame_s(results, count)
    return ratios


def closest_peer(results: dict, count: int, which: Callable[[Peer], bool]) -> tuple[str, float] | None:
    """Of the peers `which` picks, the one whose frames at `count` questions came closest to edge-agent's, and
    its seconds per frame over edge-agent's; None if none of them ran."""
    ratios = peer_ratios(results, count, which)
    if not ratios:
        return None
    name = min(ratios, key=ratios.get)
    return name, ratios[name]


def is_genai(peer: Peer) -> bool:
    return peer.genai


def four_question_ceiling(results: dict) -> float | None:
    """The strongest GenAI path's 4-question frame over edge-agent's 1-question frame, in the same run: the
    most the 4-question ratio could reach if edge-agent's three further questions cost nothing, since its
    4-question frame does all its 1-question frame does (the same vision and prefix, more rows after)."""
    strongest = closest_peer(results, TARGET_QUESTIONS, is_genai)
    if strongest is None or "1" not in results["ours_side_by_side"]["frame_s"]:
        return None
    return results["peers"][strongest[0]]["frame_s"][str(TARGET_QUESTIONS)] / ours_frame_s(results, 1)


def short_label(name: str) -> str:
    """A peer's letter: `(b)`."""
    return PEERS[name].label.split(" ", 1)[0]


def targets(results: dict) -> list[Target]:
    ours4 = results["ours"][TARGET_QUESTIONS]
    found = []
    if strongest := closest_peer(results, TARGET_QUESTIONS, is_genai):
        name, ratio = strongest
        found.append(
            Target("4 q x 16 tokens: faster than the strongest GenAI path", ratio, 2, True, against=short_label(name))
        )
    if fastest := closest_peer(results, 1, lambda peer: peer.target):
        name, ratio = fastest
        found.append(Target("1 q x 16 tokens: not slower than any peer", ratio, 1, True, against=short_label(name)))
    for name, bound in (("genai_anchor", 2), ("genai", 3), ("optimum", 10), ("transformers", 25)):
        peer_s = results["peers"].get(name, {}).get("frame_s", {}).get(str(TARGET_QUESTIONS))
        if peer_s is not None:
            ratio = peer_s / ours_frame_s(results, TARGET_QUESTIONS)
            found.append(Target(f"(issue 4) 4 q x 16 tokens: faster than {PEERS[name].label}", ratio, bound, True))
    yes_no = results["ours_yes_no"]
    found.append(
        Target(
            "4 yes_no questions: whole frame / (vision + prefix)", yes_no["frame_over_vision_and_prefix"], 1.15, False
        )
    )
    found.append(Target("new frame / unchanged-scene frame", ours4["new_vs_unchanged_frame"], 50, True))
    roof = results["roofline"]
    profile = results["decode_profile"]
    alone_ms = profile["step_ms"][str(profile["prefix_tokens"])][str(TARGET_QUESTIONS)]
    for stage, step_ms in (
        ("decode as the agent runs it (`edge-agent bench`)", roof["decode_step_ms"]),
        ("decode, the language model alone (decode profile)", alone_ms),
    ):
        found.append(Target(f"{stage}: share of the roofline", roof["decode_roofline_ms"] / step_ms, 0.4, True, ""))
    found.append(
        Target("peak RSS - model files", ours4["peak_rss_mib"] - results["model_files_mib"], 400, False, unit=" MiB")
    )
    return found


def targets_section(results: dict) -> str:
    rows = ["| target | bound | measured | |", "| --- | --- | --- | --- |"]
    rows += [target.row() for target in targets(results)]
    return (
        "## Targets (issue 28; the issue 4 rows for the record)\n\n"
        + "\n".join(rows)
        + "\n\n"
        + ceiling_remark(results)
        + "The yes_no row divides the wall time of a whole new frame (preprocessing and answering included) by "
        "the vision stage plus the prefix prefilled alone, timed on a second encoding of the same frames "
        "(`edge-agent bench --yes-no`).\n"
    )


def ceiling_remark(results: dict) -> str:
    ceiling = four_question_ceiling(results)
    if ceiling is None:
        return ""
    return (
        f"Ceiling of the first row in this run: {ceiling:.2f}x, the strongest GenAI path's 4-question frame over "
        "edge-agent's 1-question frame. edge-agent's 4-question frame does all its 1-question frame does (the "
        "same vision encoder and prefix, more rows after), so no change to what the further questions cost "
        "can carry the ratio beyond it; below 2x, only a faster vision encoder or prefix than GenAI's, on the "
        "same files, could meet the target.\n\n"
    )


def profile_section(results: dict) -> str:
    stages = list(results["ours"][TARGET_QUESTIONS]["stages_ms"])
    rows = [
        "| questions x tokens | " + " | ".join(stages) + " | frame (wall) | decode tok/s |",
        "|" + " --- |" * (len(stages) + 3),
    ]
    runs = [(f"{c} x {NEW_TOKENS}", results["ours"][c]) for c in measured_counts(results)]
    runs.append((f"{TARGET_QUESTIONS} yes/no", results["ours_yes_no"]))
    for label, run in runs:
        speed = run["decode"]["tokens_per_s"]
        rows.append(
            f"| {label} | "
            + " | ".join(f"{run['stages_ms'][s]:.0f}" for s in stages)
            + f" | {run['frame_ms']['median']:.0f} | {'-' if speed is None else f'{speed:.1f}'} |"
        )
    return (
        "## Where edge-agent's time goes (median ms per frame, `edge-agent bench`)\n\n"
        + "\n".join(rows)
        + f"\n\nThe shared prefix is {results['ours'][TARGET_QUESTIONS]['prefix_tokens']} tokens "
        "(system prompt, `USER:` and the image tokens). The agent prefills it with the first question in one "
        "call and the other questions in a second; `prefix` is the prefix prefilled alone (a second encoding "
        "of each frame) and `question_prefill` the rest, a difference of two medians (with one question it "
        "can come out a few ms below zero).\n"
    )


def roofline_section(results: dict) -> str:
    r = results["roofline"]
    int8_peak = r.get("int8_matmul_peak_gops")

    def against_peak(stage: str, label: str) -> str:
        rate = r[f"{stage}_gflop"] / (r[f"{stage}_ms"] / 1000)
        peak, arithmetic = (
            (int8_peak, "int8") if r.get(f"{stage}_int8") and int8_peak else (r["matmul_peak_gflops"], "float")
        )
        return (
            f"{label}: {r[f'{stage}_gflop']:.0f} GFLOP in {r[f'{stage}_ms']:.0f} ms = {rate:.0f} GFLOP/s "
            f"({rate / peak:.0%} of the {arithmetic} peak)"
        )

    precision = r.get("float_precision", "bf16")
    peaks = f"**{r['matmul_peak_gflops']:.0f} GFLOP/s** at the engine's float precision ({precision})"
    if int8_peak:
        peaks += f", **{int8_peak:.0f} GOP/s** with 8-bit operands"
    return (
        "## Against the hardware\n\n"
        f"- Copy bandwidth (numpy, one thread per core, read + write): **{r['copy_bandwidth_gbs']:.1f} GB/s**. "
        f"One decode step of 4 answers reads {r['decode_step_bytes'] / 1e6:.0f} MB (all INT4 LM weights once, "
        f"plus the KV cache: the prefix they share once and their own tokens, {r['kv_cache_precision']}): "
        f"roofline {r['decode_roofline_ms']:.1f} ms per step; measured "
        f"{r['decode_step_ms']:.1f} ms ({r['decode_roofline_ms'] / r['decode_step_ms']:.0%} of the roofline)."
        f"{read_bandwidth_remark(r)}\n"
        f"- Matmul peak (OpenVINO MatMul on the CPU, best of the prefix shape and 2048^3): {peaks}. "
        f"{against_peak('prefix', 'Prefix prefill')}. {against_peak('vision', 'Vision encoder')}.\n"
    )


def read_bandwidth_remark(roof: dict) -> str:
    """The step against the bandwidth of reading alone, beside the copy's (older results lack it)."""
    if "read_bandwidth_gbs" not in roof:
        return ""
    read_roofline_ms = roof["decode_step_bytes"] / roof["read_bandwidth_gbs"] / 1e6
    return (
        f" Reading alone (numpy, one thread per core, summing) ran at {roof['read_bandwidth_gbs']:.1f} GB/s: "
        f"{read_roofline_ms:.1f} ms per step, {read_roofline_ms / roof['decode_step_ms']:.0%} of it."
    )


def pass_profile_section(results: dict) -> str:
    if "pass_profile" not in results:
        return ""
    return "## The questions' pass and a decode step, by node type\n\n" + pass_profile.section(
        results["pass_profile"], results["decode_profile"]["prefix_tokens"]
    )


def startup_section(results: dict) -> str:
    ours = results["ours"][TARGET_QUESTIONS]
    start = ours["first_answer_s"]
    loads = ", ".join(f"{short_label(n)} {p['load_s']:.1f} s" for n, p in results["peers"].items())
    peers_rss = ", ".join(f"{short_label(n)} {p['peak_rss_mib']:.0f} MiB" for n, p in results["peers"].items())
    return (
        "## Start-up and memory\n\n"
        f"- edge-agent: from `edge-agent run` starting to its first answer received on MQTT: "
        f"{start['cold_cache']:.1f} s with a cold compiled-model "
        f"cache, {start['warm_cache']:.1f} s warm (`CACHE_DIR`).\n"
        f"- Peers' model load (in process, no compiled cache): {loads}.\n"
        f"- Peak RSS: edge-agent {ours['peak_rss_mib']:.0f} MiB for {results['model_files_mib']:.0f} MiB of model "
        f"files{after_frames(ours)}; peers {peers_rss}.\n"
    )


def after_frames(ours: dict) -> str:
    """The agent's resident memory once the frames are done (older results do not have it)."""
    rss = ours.get("rss_after_frames_mib")
    return f" ({rss:.0f} MiB after the frames)" if rss else ""


def plot(models: dict, path: Path) -> None:
    """Seconds per new frame of every path, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(len(models), 1, figsize=(12, 4.5 * len(models)), squeeze=False)
    for axes, (name, results) in zip(panels[:, 0], models.items()):
        counts = measured_counts(results)
        series = {"edge-agent": {c: ours_frame_s(results, c) for c in counts}}
        for peer, measured in results["peers"].items():
            series[PEERS[peer].label.split(",")[0]] = {int(c): s for c, s in measured["frame_s"].items()}
        width = 0.8 / len(series)
        for index, (label, values) in enumerate(series.items()):
            positions = [counts.index(c) + (index - (len(series) - 1) / 2) * width for c in values]
            axes.bar(positions, list(values.values()), width, label=label)
        axes.set_yscale("log")
        axes.set_xticks(range(len(counts)), [f"{c} questions x {NEW_TOKENS} tokens" for c in counts])
        axes.set_ylabel("s per new 640x480 frame (log)")
        axes.set_title(f"{name} on {results['machine']['cpu']}, {results['machine']['cores']} cores")
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# -- entry point ----------------------------------------------------------------------------------------


def ensure_models(preset: str, rebuild: bool, calibrated_vision: bool = False) -> tuple[Path, Path]:
    """The `preset` checkpoint and its INT4/INT8 export, built once into .cache/bench/; with
    `calibrated_vision`, the export whose vision encoder is fully INT8, calibrated on synthetic frames."""
    from edge_agent.devtools.testmodels import build_test_model
    from edge_agent.export import export_model

    checkpoint = CACHE / f"llava-{preset}"
    exported = CACHE / f"llava-{preset}-int4{CALIBRATED_SUFFIX if calibrated_vision else ''}"
    if rebuild or not checkpoint.is_dir():
        log(f"building the {preset} checkpoint")
        build_test_model(checkpoint, arch="llava", preset=preset, overwrite=True)
    if rebuild or not exported.is_dir():
        log(f"exporting it: INT4 language model, {'calibrated ' if calibrated_vision else ''}INT8 vision encoder")
        calibration = calibration_frames() if calibrated_vision else None
        export_model(str(checkpoint), exported, weight_format="int4", calibration_images=calibration, overwrite=True)
    return checkpoint, exported


def calibration_frames() -> Path:
    """Synthetic frames to calibrate the vision encoder on, none of them a frame the benchmark times."""
    import cv2

    from edge_agent.export import staged_output_dir

    directory = CACHE / "calibration-frames"
    if not directory.is_dir():
        with staged_output_dir(directory, overwrite=False) as staging:
            for seed in range(CALIBRATION_SEED, CALIBRATION_SEED + CALIBRATION_FRAMES):
                cv2.imwrite(str(staging / f"frame-{seed}.png"), synthetic_frame(seed))
    return directory


def read_results(raw: Path) -> dict:
    """{model name: its results} from results.json (older files held one model's results: the bench model's)."""
    stored = json.loads(raw.read_text())
    models = stored.get("models", {"bench": stored})
    for results in models.values():
        results["ours"] = {int(c): run for c, run in results["ours"].items()}
    return models


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3, help="frames per configuration (default: %(default)s)")
    parser.add_argument(
        "--slow-frames", type=int, default=1, help="frames per configuration for PyTorch FP32 (default: %(default)s)"
    )
    parser.add_argument("--skip", action="append", default=[], choices=list(PEERS), help="leave a peer out")
    parser.add_argument(
        "--counts",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=QUESTION_COUNTS,
        help="questions per frame to measure, comma-separated (default: 1,4,8; the targets need 1 and 4)",
    )
    parser.add_argument(
        "--preset",
        action="append",
        choices=BENCH_PRESETS,
        help="measure this preset's model (repeatable; default: every one of them)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild and re-export the presets' models")
    parser.add_argument(
        "--calibrated-vision",
        action="store_true",
        help="measure the presets exported with a calibrated INT8 vision encoder (`--calibration-images`) instead",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="compare on this Hugging Face LLaVA checkpoint instead of "
        "the bench model (with --exported: its OpenVINO export)",
    )
    parser.add_argument("--exported", type=Path, help="the OpenVINO export of --checkpoint")
    parser.add_argument("--report-only", action="store_true", help="re-render RESULTS.md from the last results")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="where RESULTS.md and the plot go")
    parser.add_argument("--serve", choices=["edge_agent", *PEERS], help=argparse.SUPPRESS)  # child: one path
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(OURS if args.serve == "edge_agent" else PEERS[args.serve], args.model)
        return 0
    raw = CACHE / "results.json"
    if not args.report_only:
        if bool(args.checkpoint) != bool(args.exported):
            raise SystemExit("--checkpoint and --exported go together")
        models = (
            {args.exported.name: (args.checkpoint, args.exported)}
            if args.checkpoint
            else {
                preset + (CALIBRATED_SUFFIX if args.calibrated_vision else ""): ensure_models(
                    preset, args.rebuild, args.calibrated_vision
                )
                for preset in args.preset or BENCH_PRESETS
            }
        )
        measured = json.loads(raw.read_text()).get("models", {}) if raw.is_file() else {}  # other models' runs stay
        for name, (checkpoint, exported) in models.items():
            log(f"== {name}")
            measured[name] = measure_all(args, checkpoint, exported)
            raw.write_text(json.dumps({"models": measured}, indent=1))  # what is done so far survives a failure
    write_report(read_results(raw), args.out)
    log(f"wrote {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
