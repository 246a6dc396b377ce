"""Convert a Hugging Face LLaVA checkpoint into the OpenVINO model directory the engine loads.

`edge-agent model export` calls `export_model`. The conversion is optimum-intel's (the same graphs as
`optimum-cli export openvino --task image-text-to-text`), the weight compression NNCF's; this module checks
the user's input first so mistakes end in one clear line, completes the directory (tokenizer models,
`preprocessor_config.json`) and records how it was made in `edge_agent_export.json`.

With calibration images the vision encoder is quantized fully to INT8 (weights and activations) by NNCF
post-training quantization, its activation ranges measured on the user's own images (or frames sampled
from videos) preprocessed exactly as the engine preprocesses camera frames; the language model keeps the
chosen weight format.

The heavy libraries (optimum, nncf, torch) are imported inside the functions that need them, so importing
this module stays cheap for the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import logging
import math
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from typing import Iterator

import cv2
import numpy as np

from edge_agent.errors import UserError

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")
WEIGHT_FORMATS = ("int4", "int8", "fp16", "fp32")
METADATA_FILE = "edge_agent_export.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
_VISION_GRAPH = "openvino_vision_embeddings_model.xml"

# optimum-intel's defaults for `--weight-format int4` (optimum.intel.openvino.configuration._DEFAULT_4BIT_WQ_CONFIG).
DEFAULT_INT4_GROUP_SIZE = 128
DEFAULT_INT4_RATIO = 1.0

HUB_TIMEOUT_S = 10
"""Seconds to wait for the Hugging Face Hub before deciding it cannot be reached."""

_EMBEDDINGS_INT8 = {"bits": 8, "sym": True, "group_size": -1}
"""How optimum-intel compresses the embedding models' weights under int4 and int8: symmetric, per channel."""

MIN_CALIBRATION_FRAMES = 10
"""Fewest calibration frames accepted: fewer give activation ranges that one odd image can skew."""
MAX_CALIBRATION_FRAMES = 128
"""Most calibration frames used, spread evenly over the directory's images and video frames (each
costs a few vision-encoder runs at export time)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
VISION_SMOOTH_QUANT_ALPHA = 0.6
"""SmoothQuant migration strength for the vision encoder's MatMuls: optimum-intel's value for CLIP ViTs."""

_VERSIONED_PACKAGES = ("openvino", "openvino-tokenizers", "optimum-intel", "optimum", "nncf", "transformers", "torch")
_NOISY_LOGGERS = ("optimum", "nncf", "transformers")
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}

log = logging.getLogger(__name__)


def export_model(
    src: str,
    out_dir,
    weight_format: str = "int4",
    group_size: int | None = None,
    ratio: float | None = None,
    sym: bool = False,
    calibration_images=None,
    overwrite: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Export checkpoint `src` (a local directory or a Hub model id) into `out_dir` and return its path.

    `weight_format`: int4 compresses the language model to 4 bits (`group_size` channels per scale,
    default 128; `ratio` of its layers at 4 bits, the rest at 8, default 1.0; asymmetric unless `sym`)
    and the vision and text embedding models to int8 symmetric, as optimum-cli does; int8 compresses
    every model's weights to 8 bits per channel; fp16 and fp32 keep float weights.
    `calibration_images`, a directory of images and/or videos, makes the vision encoder fully INT8
    (weights and activations) calibrated on them, whatever the weight format of the language model.
    The output only appears once the export succeeded; an existing non-empty `out_dir` is replaced only
    when `overwrite` is true.
    """
    compression = weight_compression(weight_format, group_size, ratio, sym)
    calibration = None if calibration_images is None else find_calibration_frames(calibration_images)
    source = _resolve_source(src)
    out = pathlib.Path(out_dir)
    with _quiet_libraries(), staged_output_dir(out, overwrite) as staging:
        with _stage("exporting to OpenVINO", progress):
            float_dir = _export_float(
                source,
                staging if compression is None else staging / ".float",
                "fp16" if weight_format == "fp16" else "fp32",
            )
        if compression is not None:
            with _stage(f"compressing weights to {weight_format}", progress):
                _compress(float_dir, staging, compression)
        vision = _EMBEDDINGS_INT8 if compression is not None else None
        if calibration is not None:
            with _stage(f"quantizing the vision encoder on {len(calibration.frames)} calibration frames", progress):
                vision = quantize_vision_encoder(float_dir, staging, calibration)
        if compression is not None:
            _move_missing_files(float_dir, staging)
            shutil.rmtree(float_dir)
        _write_preprocessor_config(staging)
        _write_metadata(staging, source.name, weight_format, compression, vision)
    return out


def weight_compression(weight_format: str, group_size: int | None, ratio: float | None, sym: bool) -> dict | None:
    """The language model's NNCF compression settings for the options, or None for float formats."""
    if weight_format not in WEIGHT_FORMATS:
        raise UserError(f"weight_format: unsupported {weight_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if weight_format != "int4" and (group_size is not None or ratio is not None):
        raise UserError(f"group_size/ratio: only apply to weight_format int4, not {weight_format}")
    if weight_format in ("fp16", "fp32"):
        if sym:
            raise UserError(f"sym: only applies to weight_format int4 or int8, not {weight_format}")
        return None
    if weight_format == "int8":
        return {"bits": 8, "sym": sym, "group_size": -1, "ratio": 1.0}
    group_size = DEFAULT_INT4_GROUP_SIZE if group_size is None else group_size
    ratio = DEFAULT_INT4_RATIO if ratio is None else ratio
    if group_size != -1 and group_size <= 0:
        raise UserError(f"group_size: must be a positive number of channels or -1 (per channel), not {group_size}")
    if not 0 < ratio <= 1:
        raise UserError(f"ratio: must be in (0, 1], not {ratio}")
    return {"bits": 4, "sym": sym, "group_size": group_size, "ratio": ratio}


@contextlib.contextmanager
def staged_output_dir(out_dir, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yield an empty directory beside `out_dir` that becomes `out_dir` when the block succeeds.

    A failed or interrupted build leaves `out_dir` as it was. A non-empty `out_dir` is refused unless
    `overwrite`, in which case it is replaced as a whole (no stale files from an earlier build survive) and
    never modified in place: see `_move_into_place`.
    """
    out = pathlib.Path(out_dir)
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link; export to a new directory and point the link at it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output directory is not empty; choose another or allow overwriting (--force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staging.chmod(0o777 & ~_current_umask())
    _move_into_place(staging, out)


def _move_into_place(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Rename `staging` to `out`; an existing `out` is first renamed aside, and removed once the new one is in.

    A running agent keeps the files of the old directory it has open or memory-mapped (their inodes live
    until it lets go), where rewriting them in place would kill it with SIGBUS; `out` is missing only
    between two renames and never half-deleted. An old directory that cannot be removed stays aside.
    """
    aside = None
    if out.exists():
        aside = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(aside)  # onto the empty directory just made, so no other file can take the name
    staging.rename(out)
    if aside is not None:
        try:
            shutil.rmtree(aside)
        except OSError as error:
            log.warning("could not remove the replaced directory %s (%s); remove it by hand", aside, error)


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def _stage(name: str, enabled: bool) -> Iterator[None]:
    """Show `name` and the elapsed time on stderr while the block runs (refreshed each second on a tty)."""
    if not enabled:
        yield
        return
    started = time.monotonic()
    done = threading.Event()
    live = sys.stderr.isatty()
    if live:
        threading.Thread(target=_tick, args=(name, started, done), daemon=True).start()
    else:
        print(f"{name} ...", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        done.set()
        ending = "\r" if live else ""
        print(f"{ending}{name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def _tick(name: str, started: float, done: threading.Event) -> None:
    while not done.wait(1.0):
        print(f"\r{name} ... {time.monotonic() - started:.0f} s", end="", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence the exporters' info and warning logs and tracer warnings; errors still show.

    The libraries configure their loggers when first imported, so they are imported before the levels
    are raised. OpenVINO's PyTorch frontend logs an error when it falls back from its model wrapper,
    which is not a failure: that logger is silenced completely.
    """
    import nncf  # noqa: F401
    import optimum.exporters.openvino  # noqa: F401
    import transformers

    levels = {name: logging.ERROR for name in _NOISY_LOGGERS} | {"openvino.frontend.pytorch": logging.CRITICAL}
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    previous = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in previous.items():
            logger.setLevel(level)
        transformers.logging.enable_progress_bar()


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the checkpoint comes from."""

    name: str
    """A local checkpoint directory or a Hub model id."""
    local_files_only: bool
    """True when nothing may be downloaded (a local directory, or a Hub id while the Hub is unreachable)."""


def _resolve_source(src: str) -> _Source:
    """Check that `src` is a supported LLaVA checkpoint, reading only its config.json."""
    path = pathlib.Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{src}: not a directory; pass a Hugging Face checkpoint directory or a Hub model id")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{src}: no config.json; is this a Hugging Face checkpoint directory?")
        _check_model_type(src, _read_json(config_file))
        return _Source(str(path.resolve()), local_files_only=True)
    if not _is_hub_id(src):
        raise UserError(f"{src}: neither an existing directory nor a valid Hugging Face Hub model id")
    offline_reason = _hub_offline_reason()
    _check_model_type(src, _read_json(_hub_config_file(src, offline_reason)))
    return _Source(src, local_files_only=offline_reason is not None)


def _check_model_type(src: str, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{src}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _read_json(path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read JSON ({error})") from None


def _is_hub_id(src: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(src)
    except HFValidationError:
        return False
    return True


def _hub_offline_reason() -> str | None:
    """Why the Hub cannot be used right now (offline mode, no connection), or None if it answers."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _OFFLINE_VALUES:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy can tell; the download itself will time out if it cannot
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as error:
        return f"{endpoint.hostname}: {error.strerror or error}"
    return None


def _hub_config_file(repo_id: str, offline_reason: str | None) -> str:
    """config.json of `repo_id`, downloaded, or from the local cache when the Hub cannot be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # LocalEntryNotFoundError is an EntryNotFoundError: catch it first
        return hf_hub_download(
            repo_id, "config.json", local_files_only=offline_reason is not None, etag_timeout=HUB_TIMEOUT_S
        )
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such model on the Hugging Face Hub, or it needs a login") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"cannot download {repo_id}: no network access to the Hugging Face Hub "
            f"({offline_reason or 'timed out'}); download it elsewhere and pass the local directory"
        ) from None
    except EntryNotFoundError:
        raise UserError(f"{repo_id}: the Hub repository has no config.json; is it a transformers model?") from None


def _export_float(source: _Source, out: pathlib.Path, dtype: str) -> pathlib.Path:
    """Convert the checkpoint with optimum-intel at float precision, tokenizer models included."""
    from optimum.exporters.openvino import main_export
    from optimum.intel.openvino.configuration import OVConfig

    main_export(
        source.name,
        out,
        task="image-text-to-text",
        library_name="transformers",
        ov_config=OVConfig(dtype=dtype),
        convert_tokenizer=True,
        local_files_only=source.local_files_only,
    )
    return out


def _compress(float_dir: pathlib.Path, out: pathlib.Path, compression: dict) -> None:
    """Compress the exported weights with NNCF: the language model per `compression`, the rest int8_sym.

    optimum-intel's pipeline config applies `compression` to the language model only and int8 symmetric
    per-channel to the vision and text embedding models (OVQuantizer._construct_pipeline_quantization_config).
    """
    import nncf
    from optimum.intel import OVModelForVisualCausalLM, OVWeightQuantizationConfig

    try:
        model = OVModelForVisualCausalLM.from_pretrained(
            float_dir, export=False, compile=False, quantization_config=OVWeightQuantizationConfig(**compression)
        )
    except nncf.InvalidGroupSizeError as error:
        raise UserError(_group_size_advice(compression["group_size"], str(error))) from None
    model.save_pretrained(out)


def _group_size_advice(group_size: int, nncf_message: str) -> str:
    channels = sorted({int(size) for size in re.findall(r"channel size: (\d+)", nncf_message)})
    fitting = math.gcd(group_size, *channels)
    suggestion = f"--group-size {fitting}" if fitting > 1 else "--group-size -1 (per channel)"
    return (
        f"group_size: {group_size} does not divide the input channels ({', '.join(map(str, channels))}) "
        f"of some language model layers; pass a group size that does, e.g. {suggestion}"
    )


def _move_missing_files(src_dir: pathlib.Path, out: pathlib.Path) -> None:
    """Move the tokenizer models and configs that the compressed model's save did not write."""
    for path in src_dir.iterdir():
        if not (out / path.name).exists():
            shutil.move(path, out / path.name)


# -- calibrated INT8 vision encoder ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationFrame:
    """One frame to calibrate with."""

    path: pathlib.Path
    """An image file, or a video file."""
    index: int | None = None
    """The frame's number in the video (0 = first), or None for an image."""


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """The readable frames of a calibration directory, chosen before the export starts."""

    directory: pathlib.Path
    """The directory the user passed."""
    frames: tuple[CalibrationFrame, ...]
    """At least MIN_CALIBRATION_FRAMES and at most MAX_CALIBRATION_FRAMES frames, in file order."""

    def images(self) -> Iterator[np.ndarray]:
        """Decode the frames as OpenCV BGR images (video frames read in order, one video at a time)."""
        for path, frames in itertools.groupby(self.frames, key=lambda frame: frame.path):
            wanted = [frame.index for frame in frames]
            if wanted == [None]:
                yield cv2.imread(str(path), cv2.IMREAD_COLOR)
            else:
                yield from _video_frames(path, set(wanted))


def find_calibration_frames(directory) -> CalibrationSet:
    """Choose calibration frames from the images in `directory` (and below) and the frames of its videos.

    Every image and every video frame is a candidate; when there are more than MAX_CALIBRATION_FRAMES,
    an evenly spread subset in file order is kept. Images that OpenCV cannot decode are dropped. Raises
    UserError when the directory is missing or yields fewer than MIN_CALIBRATION_FRAMES frames.
    """
    root = pathlib.Path(directory).expanduser()
    if not root.is_dir():
        reason = "is not a directory" if root.exists() else "does not exist"
        raise UserError(f"calibration_images: {root} {reason}; pass a directory of images or videos")
    candidates = []
    for path in sorted(path for path in root.rglob("*") if path.is_file()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            candidates.append(CalibrationFrame(path))
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            candidates += [CalibrationFrame(path, index) for index in range(_frame_count(path))]
    frames = [
        frame
        for frame in _spread(candidates, MAX_CALIBRATION_FRAMES)
        if frame.index is not None or _is_readable_image(frame.path)
    ]
    if not frames:
        raise UserError(
            f"calibration_images: {root} holds no readable images ({' '.join(IMAGE_SUFFIXES)}) "
            f"or videos ({' '.join(VIDEO_SUFFIXES)})"
        )
    if len(frames) < MIN_CALIBRATION_FRAMES:
        raise UserError(
            f"calibration_images: {root} holds {len(frames)} readable frames; calibration needs at "
            f"least {MIN_CALIBRATION_FRAMES} (add images, or a video to sample frames from)"
        )
    return CalibrationSet(root, tuple(frames))


def _spread(items: list, limit: int) -> list:
    """At most `limit` of `items`, evenly spaced, in their order."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _is_readable_image(path: pathlib.Path) -> bool:
    return cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_8) is not None


def _frame_count(video: pathlib.Path) -> int:
    """How many frames of `video` decode (0 when it cannot be opened); the container's count is an estimate."""
    capture = cv2.VideoCapture(str(video))
    try:
        count = 0
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


def _video_frames(video: pathlib.Path, wanted: set[int]) -> Iterator[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    try:
        for index in range(max(wanted) + 1):
            if not capture.grab():
                return
            if index in wanted:
                yield capture.retrieve()[1]
    finally:
        capture.release()


def calibration_samples(model_dir: pathlib.Path, calibration: CalibrationSet) -> list[np.ndarray]:
    """The vision encoder's inputs for the calibration frames: one [1, 3, H, W] array per tile.

    Frames go through the engine's own preprocessing for this model, so the measured activation ranges
    are those the encoder meets at run time; for llava_next every anyres tile is a sample.
    """
    from edge_agent.engine.model_dir import ModelDir
    from edge_agent.engine.preprocess import AnyresPreprocessor, ClipPreprocessor, ProcessorSettings

    model = ModelDir.open(model_dir)
    settings = ProcessorSettings.from_dict(model.processor)
    preprocess = AnyresPreprocessor(settings) if model.model_type == "llava_next" else ClipPreprocessor(settings)
    return [tile[None] for image in calibration.images() for tile in preprocess(image).pixel_values]


def quantize_vision_encoder(float_dir: pathlib.Path, out: pathlib.Path, calibration: CalibrationSet) -> dict:
    """Quantize `float_dir`'s vision encoder to INT8 weights and activations into `out`; return the recipe.

    NNCF post-training quantization for transformers: SmoothQuant first moves activation outliers into
    the MatMul weights, then the activation ranges are measured on every calibration sample and the
    biases corrected for the quantization error (fast bias correction). `out` may be `float_dir`.
    """
    import nncf
    import openvino as ov

    samples = calibration_samples(float_dir, calibration)
    model = ov.Core().read_model(float_dir / _VISION_GRAPH)
    advanced = nncf.AdvancedQuantizationParameters()
    advanced.smooth_quant_alphas.matmul = VISION_SMOOTH_QUANT_ALPHA
    quantized = nncf.quantize(
        model,
        nncf.Dataset(samples),
        subset_size=len(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED,
        fast_bias_correction=True,
        advanced_parameters=advanced,
    )
    _replace_graph(quantized, out / _VISION_GRAPH)
    return {
        "bits": 8,
        "activations": True,
        "method": "nncf.quantize",
        "model_type": "transformer",
        "preset": "mixed",
        "smooth_quant_alpha": VISION_SMOOTH_QUANT_ALPHA,
        "fast_bias_correction": True,
        "calibration": {
            "directory": str(calibration.directory),
            "frames": len(calibration.frames),
            "samples": len(samples),
        },
    }


def _replace_graph(model, xml_path: pathlib.Path) -> None:
    """Save `model` as `xml_path` (and its .bin) by renaming, so a graph still mapped from there stays valid."""
    import openvino as ov

    staged = xml_path.with_name(f".{xml_path.name}")
    ov.save_model(model, staged, compress_to_fp16=False)
    for suffix in (".bin", ".xml"):
        os.replace(staged.with_suffix(suffix), xml_path.with_suffix(suffix))


def _write_preprocessor_config(out: pathlib.Path) -> None:
    """Write preprocessor_config.json (OpenVINO GenAI reads it) from the processor's image processor.

    transformers 5 nests the image processor settings inside processor_config.json, and the exporter
    does not always write the standalone file.
    """
    if (out / PREPROCESSOR_FILE).exists():
        return
    processor = _read_json(out / "processor_config.json")
    (out / PREPROCESSOR_FILE).write_text(json.dumps(processor["image_processor"], indent=2) + "\n")


def _write_metadata(
    out: pathlib.Path, src: str, weight_format: str, compression: dict | None, vision: dict | None
) -> None:
    """Record the source, the recipe and the tool versions, so an export can be reproduced and audited.

    `language_model_compression` and `text_embeddings_compression` are NNCF weight compression settings
    (None: float weights); `vision_quantization` is those, or the calibrated full quantization's recipe.
    """
    metadata = {
        "source": src,
        "weight_format": weight_format,
        "language_model_compression": compression,
        "text_embeddings_compression": None if compression is None else _EMBEDDINGS_INT8,
        "vision_quantization": vision,
        "versions": {package: _version(package) for package in _VERSIONED_PACKAGES},
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
