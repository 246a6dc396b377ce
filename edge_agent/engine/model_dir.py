"""An exported model directory: which files it must hold and the settings the engine reads from them.

The layout is what `optimum-cli export openvino --task image-text-to-text` (and `edge-agent model export`)
writes: three OpenVINO graphs (vision embeddings, text embeddings, stateful language model), the
openvino-tokenizers tokenizer and detokenizer, `config.json`, the chat template and the image processor
settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")

GRAPHS = {
    "vision": "openvino_vision_embeddings_model.xml",
    "text_embeddings": "openvino_text_embeddings_model.xml",
    "language": "openvino_language_model.xml",
    "tokenizer": "openvino_tokenizer.xml",
    "detokenizer": "openvino_detokenizer.xml",
}


@dataclass(frozen=True)
class ModelDir:
    """Validated contents of an exported LLaVA directory."""

    path: Path
    name: str  # the model's own name, for answers, metrics and Home Assistant (`model_name`)
    model_type: str  # llava | llava_next
    image_token_id: int
    stop_token_ids: tuple[int, ...]
    processor: dict  # image processor settings (preprocessor_config.json)
    chat_template: str
    special_tokens: dict  # bos_token, eos_token, ... for the chat template
    image_newline: np.ndarray | None  # llava_next: the separator embedding after each row of tiles
    vision_grid: int  # llava_next: patches per side of one tile (image_size // patch_size)

    def graph(self, name: str) -> Path:
        return self.path / GRAPHS[name]

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"model directory {path} does not exist")
        missing = [f for f in list(GRAPHS.values()) + ["config.json"] if not (path / f).is_file()]
        if missing:
            raise UserError(
                f"model directory {path} is incomplete: missing {', '.join(missing)} "
                "(export it with `edge-agent model export`)"
            )
        config = _read_json(path / "config.json")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model {path} has model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        vision = config.get("vision_config", {})
        newline = config.get("image_newline")
        return cls(
            path=path,
            name=model_name(path, config),
            model_type=model_type,
            image_token_id=int(config.get("image_token_index", config.get("image_token_id", -1))),
            stop_token_ids=_stop_token_ids(path, config),
            processor=_processor_settings(path, config),
            chat_template=_chat_template(path),
            special_tokens=_special_tokens(path),
            image_newline=np.asarray(newline, dtype=np.float32) if newline is not None else None,
            vision_grid=int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14)),
        )


METADATA_FILE = "edge_agent_export.json"
"""What `edge-agent model export` records about the export (`export.METADATA_FILE`), `source` included."""
MAX_NAME_CHARS = 100
"""Longest model name taken from the model's files; a longer one is not a name."""


def model_name(path: Path, config: dict) -> str:
    """The model's own name: the checkpoint it was exported from (a Hub id such as `llava-hf/llava-1.5-7b-hf`,
    or a local checkpoint's folder name), as the export metadata or else config.json's `_name_or_path` says.

    The folder the export sits in says little (`model`, `llava`), so it is the name only when the files name
    nothing usable.
    """
    for source in (_export_source(path), config.get("_name_or_path")):
        if isinstance(source, str) and _is_name(name := _checkpoint_name(source)):
            return name
    return path.resolve().name


def _export_source(path: Path) -> object:
    """The `source` the export metadata records, or None."""
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no metadata (an optimum-cli export), or unreadable: other names remain
        return None
    return metadata.get("source") if isinstance(metadata, dict) else None


def _checkpoint_name(source: str) -> str:
    """A Hub id as it is, a local checkpoint directory by its folder name."""
    source = source.strip()
    return Path(source).name if source.startswith(("/", ".", "~")) else source


def _is_name(text: str) -> bool:
    return 0 < len(text) <= MAX_NAME_CHARS and text.isprintable()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _stop_token_ids(path: Path, config: dict) -> tuple[int, ...]:
    generation = path / "generation_config.json"
    ids = _as_ids(_read_json(generation).get("eos_token_id")) if generation.is_file() else []
    ids = ids or _as_ids(config.get("eos_token_id")) or _as_ids(config.get("text_config", {}).get("eos_token_id"))
    if not ids:
        raise UserError(f"model {path} defines no eos_token_id in generation_config.json or config.json")
    return tuple(dict.fromkeys(ids))


def _processor_settings(path: Path, config: dict) -> dict:
    if (path / "preprocessor_config.json").is_file():
        settings = _read_json(path / "preprocessor_config.json")
    elif (path / "processor_config.json").is_file():
        settings = _read_json(path / "processor_config.json").get("image_processor", {})
    else:
        settings = {}
    if "image_mean" not in settings:
        raise UserError(f"model {path} has no image processor settings (preprocessor_config.json)")
    if config.get("model_type") == "llava_next" and "image_grid_pinpoints" not in settings:
        settings = dict(settings, image_grid_pinpoints=config.get("image_grid_pinpoints"))
    return settings


def _chat_template(path: Path) -> str:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            template = _read_json(path / name).get("chat_template")
            if isinstance(template, str):
                return template
    raise UserError(f"model {path} has no chat template (chat_template.jinja)")


def _special_tokens(path: Path) -> dict:
    """Token strings a chat template may reference (`bos_token`, `eos_token`, ...)."""
    if not (path / "tokenizer_config.json").is_file():
        return {}
    config = _read_json(path / "tokenizer_config.json")
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        tokens[key] = value.get("content") if isinstance(value, dict) else value
    return {k: v for k, v in tokens.items() if v is not None}
