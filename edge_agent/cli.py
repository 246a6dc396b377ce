"""`edge-agent`: argument parsing and wiring only; the work lives in the modules it calls.

Heavy or optional modules (the engine, export, test-model building) are imported inside the commands
that need them, so `edge-agent ask` never imports torch and `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import UserError

DEFAULT_CONFIG = "config.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    from .logs import configure

    configure(getattr(args, "log_level", None) or "warning")
    try:
        return args.command(args) or 0
    except UserError as error:
        print(f"edge-agent: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="On-device camera agent: LLaVA on "
        "OpenVINO answers standing questions and publishes them over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="log verbosity on stderr (default: warning; `run` uses the config's)",
    )
    commands = parser.add_subparsers(metavar="COMMAND")
    _add_run(commands)
    _add_config(commands)
    _add_ask(commands)
    _add_model(commands)
    _add_demo(commands)
    _add_bench(commands)
    return parser


# -- run ------------------------------------------------------------------------------------------------


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="run the agent: camera -> standing questions -> MQTT")
    run.add_argument("--config", default=DEFAULT_CONFIG, help="configuration file (default: %(default)s)")
    run.set_defaults(command=_run)


def _run(args) -> int:
    from .config import load_config
    from .logs import configure
    from .service import run_agent

    config = load_config(args.config)
    configure(args.log_level or config.log_level)
    return run_agent(config)


# -- config ---------------------------------------------------------------------------------------------


def _add_config(commands) -> None:
    config = commands.add_parser("config", help="check a configuration file, or print its JSON Schema")
    sub = config.add_subparsers(metavar="ACTION")
    check = sub.add_parser("check", help="validate a configuration file and print one line")
    check.add_argument("--config", default=DEFAULT_CONFIG, help="configuration file (default: %(default)s)")
    check.set_defaults(command=_config_check)
    schema = sub.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the configuration, for editors")
    schema.set_defaults(command=_config_schema)
    config.set_defaults(command=lambda args: config.print_help() or 2)


def _config_check(args) -> int:
    from .config import load_config

    config = load_config(args.config)
    print(f"{args.config}: valid ({len(config.all_questions)} questions, agent_id {config.agent_id})")
    return 0


def _config_schema(args) -> int:
    from .config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


# -- ask ------------------------------------------------------------------------------------------------


def _add_ask(commands) -> None:
    ask = commands.add_parser("ask", help="answer questions about an image, or ask the running agent")
    ask.add_argument("question", nargs="?", help="the question")
    ask.add_argument(
        "--question",
        "-q",
        dest="more_questions",
        action="append",
        default=[],
        help="another question about the same frame (repeatable)",
    )
    ask.add_argument("--image", help="answer locally about this image file (else ask the running agent)")
    ask.add_argument("--model", help="exported model directory (default: the config's model.path)")
    ask.add_argument(
        "--config", default=DEFAULT_CONFIG, help="configuration file for the model or broker (default: %(default)s)"
    )
    ask.add_argument("--device", help="OpenVINO device, e.g. CPU, GPU, AUTO (default: the config's, or CPU)")
    ask.add_argument(
        "--precision",
        choices=["f32", "bf16", "f16"],
        help="pin the inference precision (f32 for exact comparisons; default: the device's)",
    )
    ask.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="longest answer in tokens (default: the config's, or 32)",
    )
    ask.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the running agent's answer (default: %(default)s)",
    )
    ask.add_argument("--json", action="store_true", help="one JSON object per line, one per question")
    ask.set_defaults(command=_ask)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _ask(args) -> int:
    questions = ([args.question] if args.question is not None else []) + args.more_questions
    if not questions:
        raise UserError("no question given")
    if any(not q.strip() for q in questions):
        raise UserError("a question is empty")
    if args.image:
        results = _ask_locally(args, questions)
    else:
        results = _ask_agent(args, questions)
    for result in results:
        print(json.dumps(result, ensure_ascii=False) if args.json else f"{result['question']}\n  {result['answer']}")
    return 0


def _optional_config(path: str, required: bool):
    from .config import load_config

    if Path(path).is_file() or required:
        return load_config(path)
    return None


def _ask_locally(args, questions: list[str]) -> list[dict]:
    from .config import usable_cache_dir
    from .engine import Engine, Prompt

    config = _optional_config(args.config, required=False) if not (args.model and args.device) else None
    model_path = args.model or (config.model.path if config else None)
    if not model_path:
        raise UserError(f"no model: pass --model DIR or set model.path in {args.config}")
    device = args.device or (config.model.device if config else "CPU")
    max_new_tokens = args.max_new_tokens or (config.model.max_new_tokens if config else 32)
    frame = _read_image(args.image)
    engine = Engine.load(
        model_path,
        device=device,
        inference_precision=args.precision,
        cache_dir=usable_cache_dir(config.model.cache_dir) if config and not args.model else None,
    )
    context = engine.encode(frame)
    answers = engine.answer(context, [Prompt(question, max_new_tokens) for question in questions])
    return [
        {
            "question": a.question,
            "answer": a.text,
            "token_ids": a.token_ids,
            "timings_ms": {k: round(v, 3) for k, v in a.timings.as_dict().items()},
        }
        for a in answers
    ]


def _read_image(path: str):
    from .capture.reader import to_bgr
    from .capture.sources import UnusableImage, decode_image

    if not Path(path).is_file():
        raise UserError(f"image {path} does not exist")
    try:
        frame = to_bgr(decode_image(Path(path)))
    except UnusableImage as problem:
        raise UserError(f"cannot read image {path}: {problem}") from None
    if frame is None:
        raise UserError(f"cannot read image {path}: its pixel layout is not one a camera produces")
    return frame


def _ask_agent(args, questions: list[str]) -> list[dict]:
    from .mqtt import ask_remote

    config = _optional_config(args.config, required=True)
    results = []
    for question in questions:
        reply = ask_remote(config.mqtt, config.agent_id, question, timeout_s=args.timeout)
        results.append({"question": question, **reply})
    return results


# -- bench ----------------------------------------------------------------------------------------------


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench", help="measure per-stage latency, memory and start-up time of a model on synthetic 640x480 frames"
    )
    bench.add_argument("--model", required=True, help="exported model directory")
    bench.add_argument("--questions", type=_positive_int, default=4, help="questions per frame (default: %(default)s)")
    bench.add_argument(
        "--new-tokens",
        type=_positive_int,
        default=16,
        help="tokens per answer, end-of-sequence ignored (default: %(default)s)",
    )
    bench.add_argument(
        "--frames", type=_positive_int, default=5, help="frames measured after one warm-up frame (default: %(default)s)"
    )
    bench.add_argument(
        "--yes-no", action="store_true", help="ask the questions as yes/no (constrained answers) instead of free text"
    )
    bench.add_argument("--device", default="CPU", help="OpenVINO device (default: %(default)s)")
    bench.add_argument(
        "--cache-dir",
        type=Path,
        help="compiled-model cache directory (start-up runs use a fresh temporary subdirectory of it)",
    )
    bench.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench.set_defaults(command=_bench)


def _bench(args) -> int:
    from .devtools.bench import BenchSettings, format_report, run_bench

    report = run_bench(
        BenchSettings(
            model=Path(args.model),
            questions=args.questions,
            new_tokens=args.new_tokens,
            frames=args.frames,
            yes_no=args.yes_no,
            device=args.device,
            cache_dir=args.cache_dir,
        )
    )
    print(json.dumps(report) if args.json else format_report(report))
    return 0


# -- demo -------------------------------------------------------------------------------------------------


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the agent on a generated kiosk video with the shipped demo "
        "model and a local broker, printing the answers",
    )
    demo.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    demo.add_argument("--model", help="model directory (default: the shipped models/demo-llava/openvino-int8)")
    demo.add_argument(
        "--video-seconds", type=float, default=24.0, help="length of the generated story, looped (default: %(default)s)"
    )
    demo.set_defaults(command=_demo)


def _demo(args) -> int:
    from .devtools.demo import run_demo

    return run_demo(args.duration, args.model, video_seconds=args.video_seconds)


# -- model ----------------------------------------------------------------------------------------------


def _add_model(commands) -> None:
    model = commands.add_parser("model", help="export models, build test models")
    sub = model.add_subparsers(metavar="ACTION")
    export = sub.add_parser(
        "export", help="convert a Hugging Face LLaVA checkpoint to OpenVINO (needs the `export` extra)"
    )
    export.add_argument("src", help="Hugging Face model id (e.g. llava-hf/llava-1.5-7b-hf) or local checkpoint dir")
    export.add_argument("out", help="output directory")
    export.add_argument(
        "--weight-format",
        choices=["int4", "int8", "fp16", "fp32"],
        default="int4",
        help="int4 (default): INT4 language model, INT8 vision and embeddings; "
        "int8: every model INT8; fp16/fp32: no compression",
    )
    export.add_argument("--group-size", type=int, help="INT4 channels per scale (default 128; -1 per channel)")
    export.add_argument("--ratio", type=float, help="INT4 share of language-model layers at 4 bits (default 1.0)")
    export.add_argument("--sym", action="store_true", help="symmetric quantization (default asymmetric)")
    export.add_argument(
        "--calibration-images",
        help="a directory of your camera's images or videos (10+ frames): "
        "makes the vision encoder fully INT8 (weights and activations), calibrated on them",
    )
    export.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory as a whole, "
        "by renames once the export succeeded (safe under a running agent: restart it to load "
        "the new model)",
    )
    export.set_defaults(command=_model_export)
    build = sub.add_parser(
        "build-test",
        help="write a random-weight LLaVA checkpoint for tests and benchmarks, offline (needs the `export` extra)",
    )
    build.add_argument("out", help="output directory")
    build.add_argument("--arch", choices=["llava", "llava_next"], default="llava")
    build.add_argument(
        "--preset",
        choices=[
            "tiny",
            "tiny-qwen2-layout",
            "bench",
            "llava-1.5-7b",
            "llava-next-mistral-7b",
            "llava-interleave-qwen-0.5b",
        ],
        default="tiny",
        help="tiny: seconds to build, for unit tests; bench: realistic shapes (CLIP ViT-L/14-336, 0.4B Llama-style "
        "LM); the others: bench's tower with the named model's attention layout and MLP in fewer layers",
    )
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    build.set_defaults(command=_model_build_test)
    model.set_defaults(command=lambda args: model.print_help() or 2)


def _require_export_extra() -> None:
    try:
        import optimum.intel  # noqa: F401
    except ImportError:
        raise UserError("this command needs the export extra: pip install 'edge-agent[export]'") from None


def _model_export(args) -> int:
    _require_export_extra()
    from .export import export_model

    out = export_model(
        args.src,
        args.out,
        weight_format=args.weight_format,
        group_size=args.group_size,
        ratio=args.ratio,
        sym=args.sym,
        calibration_images=args.calibration_images,
        overwrite=args.force,
        progress=True,
    )
    print(out)
    return 0


def _model_build_test(args) -> int:
    _require_export_extra()
    from .devtools.testmodels import build_test_model

    print(build_test_model(args.out, arch=args.arch, preset=args.preset, seed=args.seed, overwrite=args.force))
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
