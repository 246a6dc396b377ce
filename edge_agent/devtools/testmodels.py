"""Build random-weight LLaVA checkpoints offline, for tests and benchmarks (`edge-agent model build-test`).

The checkpoint is a normal Hugging Face directory (config, safetensors weights, tokenizer, chat template,
image processor, processor) that `edge-agent model export` converts like a real LLaVA. Nothing is
downloaded: the tokenizer is trained here on a corpus generated in code, and every random choice comes
from `seed`, so the same arguments give the same weights and tokenizer.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
from typing import Iterator

from edge_agent.errors import UserError
from edge_agent.export import staged_output_dir

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"

# LLaVA-1.5 conversation format. Content may be a plain string (as OpenVINO GenAI passes it) or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts; images come before text in a turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
    "{{ part['text'] + ' ' }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- else -%}"
    "{{ message['role'].upper() + ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{ part['text'] + ' ' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_CORPUS_WORDS = (
    "the a an is are there any how many what which where color colour door window person people cup "
    "bag car dog cat chair table red green blue yellow white black open closed yes no zero one two three "
    "four five left right on in of near camera image picture frame room kitchen desk shelf light dark"
).split()
_CORPUS_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "x"]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of one preset: a CLIP vision tower, a 2-layer MLP projector and a Llama-style LM."""

    image_size: int
    """Side of the square image the vision tower sees, in pixels."""
    patch_size: int
    """Side of one vision patch, in pixels; the tower yields (image_size / patch_size)^2 image tokens."""
    vision_hidden: int
    """Width of the vision transformer (channels per token)."""
    vision_intermediate: int
    """Width of the vision transformer's MLP."""
    vision_layers: int
    """Number of vision transformer layers."""
    vision_heads: int
    """Attention heads per vision layer."""
    text_hidden: int
    """Width of the language model (channels per token); the projector maps image features to it."""
    text_intermediate: int
    """Width of the language model's gated MLP."""
    text_layers: int
    """Number of language model layers."""
    text_heads: int
    """Query attention heads per language model layer."""
    text_kv_heads: int
    """Key/value heads per language model layer (grouped-query attention when fewer than text_heads)."""
    vocab_size: int
    """Number of tokens, special tokens included; the tokenizer is trained until it has exactly this many."""
    max_positions: int
    """Longest sequence the language model accepts, in tokens."""
    corpus_lines: int
    """Lines of generated text the tokenizer is trained on (more lines are needed for bigger vocabularies)."""
    init_std: float
    """Standard deviation of the random weights; the tiny preset uses a large one so greedy answers vary."""
    grid_pinpoints: tuple[tuple[int, int], ...]
    """llava_next only: the (height, width) resolutions, in pixels, that anyres tiles an image into."""


PRESETS = {
    "tiny": Shapes(
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_intermediate=64,
        vision_layers=2,
        vision_heads=4,
        text_hidden=64,
        text_intermediate=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        vocab_size=1000,
        max_positions=2048,
        corpus_lines=3000,
        init_std=0.5,
        grid_pinpoints=((32, 64), (64, 32), (64, 64), (32, 96), (96, 32)),
    ),
    # CLIP ViT-L/14-336 as in LLaVA-1.5, with a ~0.35B Llama-style LM: realistic compute per frame.
    "bench": Shapes(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        text_hidden=1024,
        text_intermediate=2816,
        text_layers=24,
        text_heads=16,
        text_kv_heads=8,
        vocab_size=32000,
        max_positions=4096,
        corpus_lines=200_000,
        init_std=0.02,
        grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    ),
}


def _deployed(heads: int, kv_heads: int, head_size: int, intermediate: int, layers: int) -> Shapes:
    """`bench`'s CLIP ViT-L/14-336 tower with a language model whose layers have a deployed model's shapes.

    Each layer is the real one: its query heads, key/value heads, head size (the width is heads x head
    size), and MLP width, so a token costs per layer what it costs in the real model. Only the layer count
    may be cut, so that a benchmark run stays short: the 7B models keep 2 of their 32 layers, which leaves
    the cost per layer and per attention head as it is, while the whole model's weights (and a decode step's
    bytes) shrink about 16-fold and the LM head weighs more among them. The vocabulary is `bench`'s 32,000
    tokens (the tokenizer is trained here; Qwen2's real one has 151,936), and the attention has no biases
    (Qwen2 has q/k/v biases, a negligible cost).
    """
    return dataclasses.replace(
        PRESETS["bench"],
        text_hidden=heads * head_size,
        text_intermediate=intermediate,
        text_layers=layers,
        text_heads=heads,
        text_kv_heads=kv_heads,
    )


# The attention layouts of the LLaVA models people deploy (the real query heads, key/value heads and head size):
PRESETS |= {
    # LLaVA-1.5-7B's Vicuna-7B: multi-head attention.
    "llava-1.5-7b": _deployed(heads=32, kv_heads=32, head_size=128, intermediate=11008, layers=2),
    # LLaVA-NeXT-Mistral-7B's Mistral-7B: 4 query heads per key/value head.
    "llava-next-mistral-7b": _deployed(heads=32, kv_heads=8, head_size=128, intermediate=14336, layers=2),
    # llava-interleave-qwen-0.5b's Qwen2-0.5B, every layer kept: 7 query heads per key/value head.
    "llava-interleave-qwen-0.5b": _deployed(heads=14, kv_heads=2, head_size=64, intermediate=4864, layers=24),
}
# For unit tests: `tiny` with one language model layer of Qwen2-0.5B's attention layout (14 query heads, 2
# key/value heads, head size 64), so the engine's grouped-query paths are checked against transformers.
PRESETS["tiny-qwen2-layout"] = dataclasses.replace(
    PRESETS["tiny"], text_hidden=14 * 64, text_intermediate=256, text_layers=1, text_heads=14, text_kv_heads=2
)


def build_test_model(
    out_dir, arch: str = "llava", preset: str = "tiny", seed: int = 0, overwrite: bool = False
) -> pathlib.Path:
    """Write a random-weight `arch` checkpoint with `preset` shapes into `out_dir` and return its path."""
    if arch not in ARCHS:
        raise UserError(f"arch: unsupported {arch!r}; choose one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise UserError(f"preset: unknown {preset!r}; choose one of {', '.join(PRESETS)}")
    return build_checkpoint(out_dir, arch, PRESETS[preset], seed, overwrite)


def build_checkpoint(out_dir, arch: str, shapes: Shapes, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Write a random-weight `arch` checkpoint of any `shapes` (a preset, or one changed for a test)."""
    with staged_output_dir(out_dir, overwrite) as staging:
        tokenizer = train_tokenizer(shapes, seed)
        _processor(arch, shapes, tokenizer).save_pretrained(staging)
        _random_model(arch, shapes, tokenizer, seed).save_pretrained(staging)
    return pathlib.Path(out_dir)


def train_tokenizer(shapes: Shapes, seed: int):
    """A byte-level BPE tokenizer with exactly `shapes.vocab_size` tokens that adds BOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shapes.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(synthetic_corpus(seed, shapes.corpus_lines), trainer)
    if bpe.get_vocab_size() != shapes.vocab_size:
        raise RuntimeError(f"tokenizer reached {bpe.get_vocab_size()} tokens, not {shapes.vocab_size}")
    bos = SPECIAL_TOKENS[1]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def synthetic_corpus(seed: int, lines: int) -> Iterator[str]:
    """Question-like lines mixing scene words, invented words and numbers, reproducible from `seed`."""
    rng = random.Random(seed)
    for _ in range(lines):
        words = [_corpus_word(rng) for _ in range(rng.randint(4, 16))]
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize()
        yield line + rng.choice(("?", ".", "!", ",", "", f" {rng.randint(0, 9999)}"))


def _corpus_word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_CORPUS_WORDS)
    return "".join(rng.choice(_CORPUS_SYLLABLES) for _ in range(rng.randint(1, 4)))


def image_tokens_per_tile(shapes: Shapes) -> int:
    """Image tokens the LM sees for one tile: one per patch (the `default` strategy drops CLIP's CLS)."""
    return (shapes.image_size // shapes.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class _ArchClasses:
    """The transformers classes that make up one LLaVA architecture."""

    image_processor: str
    processor: str
    config: str
    model: str


_ARCH_CLASSES = {
    "llava": _ArchClasses("CLIPImageProcessor", "LlavaProcessor", "LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": _ArchClasses(
        "LlavaNextImageProcessor", "LlavaNextProcessor", "LlavaNextConfig", "LlavaNextForConditionalGeneration"
    ),
}
ARCHS = tuple(_ARCH_CLASSES)


def _anyres_options(arch: str, shapes: Shapes) -> dict:
    """The settings only llava_next has, shared by its image processor and its config."""
    if arch != "llava_next":
        return {}
    return {"image_grid_pinpoints": [list(pinpoint) for pinpoint in shapes.grid_pinpoints]}


def _processor(arch: str, shapes: Shapes, tokenizer):
    import transformers

    classes = _ARCH_CLASSES[arch]
    image_processor = getattr(transformers, classes.image_processor)(
        size={"shortest_edge": shapes.image_size},
        crop_size={"height": shapes.image_size, "width": shapes.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        **_anyres_options(arch, shapes),
    )
    return getattr(transformers, classes.processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=shapes.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def language_config(shapes: Shapes, **special_ids):
    """The transformers config of the Llama-style language model of `shapes` (head size: width / heads)."""
    import transformers

    return transformers.LlamaConfig(
        hidden_size=shapes.text_hidden,
        intermediate_size=shapes.text_intermediate,
        num_hidden_layers=shapes.text_layers,
        num_attention_heads=shapes.text_heads,
        num_key_value_heads=shapes.text_kv_heads,
        vocab_size=shapes.vocab_size,
        max_position_embeddings=shapes.max_positions,
        initializer_range=shapes.init_std,
        **special_ids,
    )


def _random_model(arch: str, shapes: Shapes, tokenizer, seed: int):
    import torch
    import transformers

    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=shapes.vision_hidden,
        intermediate_size=shapes.vision_intermediate,
        num_hidden_layers=shapes.vision_layers,
        num_attention_heads=shapes.vision_heads,
        image_size=shapes.image_size,
        patch_size=shapes.patch_size,
        projection_dim=shapes.vision_hidden,
        initializer_range=shapes.init_std,
    )
    text = language_config(shapes, **special_ids)
    classes = _ARCH_CLASSES[arch]
    config = getattr(transformers, classes.config)(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_tokens_per_tile(shapes),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        **special_ids,
        **_anyres_options(arch, shapes),
    )
    torch.manual_seed(seed)
    return getattr(transformers, classes.model)(config).eval()
