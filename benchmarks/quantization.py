"""Quantization recipes side by side: speed, size and how often each answers like FP32.

    python benchmarks/quantization.py [--frames 20] [--models bench demo] [--report-only]

For each model (the random-weight `bench` LLaVA, and the trained demo LLaVA when
`models/demo-llava/checkpoint/` exists) it exports four recipes with `edge_agent.export.export_model`:

- `fp32`: float weights everywhere (the reference; run at f32 inference precision);
- `int8`: 8-bit weights everywhere;
- `int4`: the default: INT4 language model, INT8-weight vision encoder;
- `int4+calibrated-vision`: INT4 language model, vision encoder fully INT8 (weights and activations)
  calibrated on 64 frames of the synthetic kiosk camera (`edge_agent.devtools.scenes`, the user's "own camera").

Then, each recipe in its own child process (so none inherits another's memory or threads), after one
warm-up frame, on `--frames` new 640x480 kiosk frames it measures the vision encoder's time and the whole
frame's time for 4 questions x 16 tokens (end-of-sequence ignored), and asks every question of the frame
constrained to its options (yes/no, choices, counts, colours). Agreement with FP32: the share of
free answers with the same token sequence and the same first token, and the share of constrained
answers with the same choice; for the demo model also the constrained answers' accuracy against the
scene's ground truth. The raw numbers go to `.cache/quantization/results.json`; the section
`## Quantization recipes` at the end of `benchmarks/RESULTS.md` is written (or replaced) from them.

Needs the `export` extra. Never run by the tests or CI. Expect about half an hour per model on 2 busy cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.config import Question  # noqa: E402
from edge_agent.devtools import scenes  # noqa: E402
from edge_agent.engine import Prompt  # noqa: E402
from edge_agent.questions import build_prompt  # noqa: E402

CACHE = REPO / ".cache" / "quantization"
RESULTS_JSON = CACHE / "results.json"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Quantization recipes"
BENCH_CHECKPOINT = REPO / ".cache" / "bench" / "llava-bench"
BENCH_INT4 = REPO / ".cache" / "bench" / "llava-bench-int4"
"""The benchmarks' own default export of the bench model, reused for the `int4` recipe when present."""
DEMO_CHECKPOINT = REPO / "models" / "demo-llava" / "checkpoint"

RECIPES = {
    "fp32": {"weight_format": "fp32"},
    "int8": {"weight_format": "int8"},
    "int4": {"weight_format": "int4"},
    "int4+calibrated-vision": {"weight_format": "int4", "calibrated": True},
}
CALIBRATION_FRAMES = 64
CALIBRATION_SEED = 5000
"""Calibration frames are scenes 5000.., evaluation frames 7000..: the encoder never saw the frames it is judged on."""
EVALUATION_SEED = 7000
FRAME_SIZE = (640, 480)
FREE_QUESTIONS = 4
NEW_TOKENS = 16
CHILD_TIMEOUT_S = 3600


# -- frames and questions --------------------------------------------------------------------------------


def kiosk_frame(seed: int) -> tuple[np.ndarray, list[scenes.Asked]]:
    """A 640x480 frame of a random kiosk scene and its questions with their true answers."""
    rng = np.random.default_rng(seed)
    scene = scenes.random_scene(rng)
    return scenes.render(scene, *FRAME_SIZE, rng), scenes.questions_for(scene, rng)


def options_of(question: Question) -> tuple[str, ...]:
    """The answers a question is constrained to: Yes/No, its choices, a count, or a colour."""
    if question.type == "yes_no":
        return ("Yes", "No")
    if question.type == "number":
        return tuple(str(count) for count in range(scenes.MAX_PEOPLE + 1))
    if question.type == "text":
        return tuple(scenes.COLOURS)
    return question.options


def write_calibration_images(directory: Path) -> Path:
    """JPEG frames from the kiosk camera, as a user would collect them for `--calibration-images`."""
    import cv2

    from edge_agent.export import staged_output_dir

    if not directory.is_dir():
        with staged_output_dir(directory, overwrite=False) as staging:
            for seed in range(CALIBRATION_SEED, CALIBRATION_SEED + CALIBRATION_FRAMES):
                cv2.imwrite(str(staging / f"camera-{seed}.jpg"), kiosk_frame(seed)[0])
    return directory


# -- exports ---------------------------------------------------------------------------------------------


def checkpoints(names: list[str]) -> dict[str, Path]:
    """The checkpoints to measure: the bench model (built once if missing) and the demo model if trained."""
    found = {}
    if "bench" in names:
        if not (BENCH_CHECKPOINT / "config.json").is_file():
            from edge_agent.devtools.testmodels import build_test_model

            build_test_model(BENCH_CHECKPOINT, "llava", "bench")
        found["bench"] = BENCH_CHECKPOINT
    if "demo" in names:
        if (DEMO_CHECKPOINT / "config.json").is_file():
            found["demo"] = DEMO_CHECKPOINT
        else:
            print(f"skipping the demo model: {DEMO_CHECKPOINT} does not exist yet", file=sys.stderr)
    return found


def export_recipe(model: str, checkpoint: Path, recipe: str, calibration: Path) -> Path:
    """The model directory for `recipe`, exported unless it already is."""
    from edge_agent.export import export_model

    if model == "bench" and recipe == "int4" and (BENCH_INT4 / "openvino_language_model.xml").is_file():
        return BENCH_INT4
    out = CACHE / model / recipe
    if (out / "edge_agent_export.json").is_file():
        return out
    options = RECIPES[recipe]
    print(f"{model}: exporting {recipe}", file=sys.stderr, flush=True)
    return export_model(
        str(checkpoint),
        out,
        weight_format=options["weight_format"],
        overwrite=True,
        calibration_images=calibration if options.get("calibrated") else None,
    )


def model_sizes_mib(directory: Path) -> dict:
    """Sizes of the model's weight files: the vision encoder's and the whole directory's."""
    sizes = {path.name: path.stat().st_size / 2**20 for path in directory.glob("openvino_*.bin")}
    return {"vision": sizes["openvino_vision_embeddings_model.bin"], "total": sum(sizes.values())}


# -- measuring one recipe (child process) ----------------------------------------------------------------


def measure(model_dir: Path, frames: int, precision: str | None) -> dict:
    """Per frame: vision and whole-frame milliseconds, free answers' token ids, constrained choices."""
    from edge_agent.engine import Engine

    engine = Engine.load(model_dir, inference_precision=precision)
    answer_frame(engine, *kiosk_frame(EVALUATION_SEED - 1))  # warm-up
    records = [answer_frame(engine, *kiosk_frame(seed)) for seed in range(EVALUATION_SEED, EVALUATION_SEED + frames)]
    return {key: [record[key] for record in records] for key in records[0]}


def answer_frame(engine, frame: np.ndarray, asked: list[scenes.Asked]) -> dict:
    started = time.perf_counter()
    context = engine.encode(frame)
    free = engine.answer(
        context, [Prompt(build_prompt(item.question), NEW_TOKENS, ignore_eos=True) for item in asked[:FREE_QUESTIONS]]
    )
    frame_ms = (time.perf_counter() - started) * 1000.0
    constrained = engine.answer(
        context, [Prompt(build_prompt(item.question), options=options_of(item.question)) for item in asked]
    )
    return {
        "vision_ms": context.timings.vision_ms,
        "frame_ms": frame_ms,
        "free_ids": [answer.token_ids for answer in free],
        "choices": [answer.text for answer in constrained],
        "truths": [item.answer_text for item in asked],
    }


def measure_in_child(model_dir: Path, frames: int, precision: str | None) -> dict:
    command = [sys.executable, __file__, "--measure", str(model_dir), "--frames", str(frames)]
    if precision:
        command += ["--precision", precision]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model_dir} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- agreement -------------------------------------------------------------------------------------------


def agreement(run: dict, reference: dict) -> dict:
    """Shares of answers that equal the FP32 reference's (and, with known truths, that are right)."""
    pairs = [
        (ids, ref)
        for frame, ref_frame in zip(run["free_ids"], reference["free_ids"])
        for ids, ref in zip(frame, ref_frame)
    ]
    choices = [
        (choice, ref, truth)
        for frame, ref_frame, truths in zip(run["choices"], reference["choices"], run["truths"])
        for choice, ref, truth in zip(frame, ref_frame, truths)
    ]
    return {
        "exact_sequence": share(ids == ref for ids, ref in pairs),
        "first_token": share(ids[:1] == ref[:1] for ids, ref in pairs),
        "choice": share(choice == ref for choice, ref, _ in choices),
        "accuracy": share(choice == truth for choice, _, truth in choices),
        "free_answers": len(pairs),
        "constrained_answers": len(choices),
    }


def share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


def summarize(model_dir: Path, run: dict, reference: dict) -> dict:
    return {
        "directory": str(model_dir.relative_to(REPO)),
        "vision_ms": statistics.median(run["vision_ms"]),
        "frame_ms": statistics.median(run["frame_ms"]),
        "size_mib": model_sizes_mib(model_dir),
        "agreement": agreement(run, reference),
    }


# -- the whole run ---------------------------------------------------------------------------------------


def run(models: list[str], frames: int) -> dict:
    """Export and measure every recipe of `models`; results of models not measured now are kept."""
    calibration = write_calibration_images(CACHE / "calibration")
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    for model, checkpoint in checkpoints(models).items():
        directories = {recipe: export_recipe(model, checkpoint, recipe, calibration) for recipe in RECIPES}
        load_before = os.getloadavg()[0]
        raw = {}
        for recipe, directory in directories.items():
            print(f"{model}: measuring {recipe}", file=sys.stderr, flush=True)
            raw[recipe] = measure_in_child(directory, frames, "f32" if recipe == "fp32" else None)
        results[model] = {
            "machine": machine(),
            "frames": frames,
            "load": [load_before, os.getloadavg()[0]],
            "recipes": {recipe: summarize(directories[recipe], raw[recipe], raw["fp32"]) for recipe in RECIPES},
        }
    return results


def machine() -> dict:
    import openvino as ov

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "openvino": ov.__version__, "date": datetime.date.today().isoformat()}


# -- report ----------------------------------------------------------------------------------------------


def format_section(results: dict) -> str:
    lines = [
        SECTION,
        "",
        f"Per frame: median over new 640x480 kiosk frames, 4 questions x {NEW_TOKENS} tokens (end-of-sequence "
        "ignored). Agreement is with the `fp32` recipe run at f32 precision (the others run at the CPU's "
        "default precision, bf16 where supported, as the agent does): `same tokens` = whole answers equal, "
        "`first token` = first tokens equal, `same choice` = constrained answers (every question of the "
        "frame: yes/no, options, counts, colours) equal. The calibrated vision encoder was calibrated on "
        f"{CALIBRATION_FRAMES} other frames of the same camera (`edge-agent model export ... "
        "--calibration-images DIR`). Reproduce with `python benchmarks/quantization.py`.",
        "",
    ]
    for model, measured in results.items():
        lines += model_table(model, measured)
    if "bench" in results:
        lines += [
            "The bench model has random weights: its answers are near-ties between arbitrary tokens, so "
            "its agreement figures show how much a recipe perturbs the logits, not how accurate it is.",
            "",
        ]
    return "\n".join(lines)


def model_table(model: str, measured: dict) -> list[str]:
    m = measured["machine"]
    accuracy = model == "demo"
    lines = [
        f"### {model} model",
        "",
        f"{m['cpu']}, {m['cores']} cores, OpenVINO {m['openvino']}, {m['date']}; {measured['frames']} frames "
        f"per recipe; load average {measured['load'][0]:.1f} before, {measured['load'][1]:.1f} after "
        "(the recipes run one after another, so their own runs count in it; compare recipes within this "
        "table).",
        "",
        "| recipe | vision ms/frame | frame ms | vision MiB | model MiB | same tokens | first token "
        "| same choice |" + (" accuracy |" if accuracy else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if accuracy else ""),
    ]
    for recipe, row in measured["recipes"].items():
        a = row["agreement"]
        lines.append(
            f"| `{recipe}` | {row['vision_ms']:.0f} | {row['frame_ms']:.0f} | "
            f"{row['size_mib']['vision']:.0f} | {row['size_mib']['total']:.0f} | "
            f"{a['exact_sequence']:.0%} | {a['first_token']:.0%} | {a['choice']:.0%} |"
            + (f" {a['accuracy']:.0%} |" if accuracy else "")
        )
    return lines + ["", f"{a['free_answers']} free and {a['constrained_answers']} constrained answers per recipe.", ""]


def write_section(section: str) -> None:
    """Replace the `## Quantization recipes` section at the end of RESULTS.md, or append it."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    head = text.split(f"\n{SECTION}\n")[0].rstrip("\n")
    RESULTS_MD.write_text(f"{head}\n\n{section.rstrip()}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20, help="evaluation frames per recipe")
    parser.add_argument("--models", nargs="+", choices=["bench", "demo"], default=["bench", "demo"])
    parser.add_argument("--report-only", action="store_true", help=f"rewrite the section from {RESULTS_JSON}")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child process: one recipe
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.frames, args.precision)))
        return
    if not args.report_only:
        CACHE.mkdir(parents=True, exist_ok=True)
        kept = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}  # other models' last run
        RESULTS_JSON.write_text(json.dumps({**kept, **run(args.models, args.frames)}, indent=2) + "\n")
    write_section(format_section(json.loads(RESULTS_JSON.read_text())))
    print(RESULTS_MD)


if __name__ == "__main__":
    main()
