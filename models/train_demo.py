"""Train the demo LLaVA on synthetic kiosk scenes, on the CPU, and export it to OpenVINO INT8.

    python models/train_demo.py            # about 50 minutes on 2 shared cores
    python models/train_demo.py --resume   # continue from the checkpoint: only the stages it lacks

Trained end to end from scratch, a LLaVA this small learns the answer format long before it learns to
look, so training is staged (see models/demo-llava/MODEL_CARD.md):
1. vision: the CLIP tower alone, with small attention-pooling heads that read the scene facts (door,
   people, cup colour, bag) from its patch tokens;
2. language: the projector and the language model on question/answer turns, the tower frozen;
3. all: everything together, the tower at a lower learning rate;
4. door drill, in two steps: "door-open" adds an "is the door open?" question to every chat, then "door"
   asks each image twice, once with "is the door open?" and once with "is the door closed?". After stage
   3 the model answers door yes/no questions 50/50 whatever the question and the door (a symmetric
   saddle: the answer must combine the question's polarity with the door, and neither alone predicts
   it). With one polarity only, the answer follows the door alone, which the model learns within tens of
   steps; the other polarity is then a flip of a readout that exists.
The drill stages draw their batches from their own generators (seeded by --seed and a fixed per-stage
number), so --resume from the stage-3 checkpoint gives what a run from scratch gives. Whether the "door"
stage leaves the saddle depends on the batch order: with door-open batch seed 3 instead of 9 it did not
within 400 steps (see the model card); a run that ends with door yes/no loss near 0.06 has not.
Each stage uses AdamW with a short warm-up and a cosine decay. Images are drawn by `edge_agent.devtools.scenes`
from seeds 0..--scenes-1 and preprocessed exactly as the engine does; every image carries one question
per fact, asked as `edge_agent.questions.build_prompt` asks it, with the loss on answer tokens only.
Everything random comes from --seed, so a run is reproducible (up to CPU floating-point order).

Needs the export extra (torch, transformers, optimum-intel, nncf).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

import numpy as np
import torch
from torch import nn

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.config import Question  # noqa: E402
from edge_agent.devtools import scenes, testmodels  # noqa: E402
from edge_agent.engine.preprocess import ClipPreprocessor, ProcessorSettings  # noqa: E402
from edge_agent.export import export_model, staged_output_dir  # noqa: E402
from edge_agent.questions import build_prompt  # noqa: E402

OUT = REPO / "models" / "demo-llava"
STAGES_FILE = "training_stages.json"
"""Written into the checkpoint: the stages it has been through, so --resume runs only the rest."""
STAGE_NAMES = ("vision", "language", "all", "door-open", "door")

SHAPES = testmodels.Shapes(
    image_size=64,
    patch_size=8,
    vision_hidden=128,
    vision_intermediate=512,
    vision_layers=4,
    vision_heads=4,
    text_hidden=256,
    text_intermediate=512,
    text_layers=4,
    text_heads=8,
    text_kv_heads=2,
    vocab_size=1000,
    max_positions=512,
    corpus_lines=3000,
    init_std=0.02,
    grid_pinpoints=(),
)
"""64 px frames in 8 px patches (64 image tokens), a 4-layer CLIP tower and a 4-layer Llama LM: ~3.5 M weights."""

TRAIN_SIZES = tuple(size for size in scenes.RESOLUTIONS if size[0] * size[1] <= 400 * 400)
"""Training renders at the smaller sizes only (rendering and Pillow-exact resizing cost grows with the
pixels); evaluation uses every size, so the larger ones are a held-out condition."""

ATTRIBUTES = {"door": 2, "people": scenes.MAX_PEOPLE + 1, "cup": len(scenes.COLOURS), "bag": len(scenes.COLOURS) + 1}
"""Vision-stage targets and their class counts; bag class 0 means no bag, 1.. a colour."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage."""

    name: str
    """Shown in the progress log."""
    steps: int
    """Optimizer steps."""
    lr: float
    """Peak learning rate, reached after the warm-up and decayed to ~0 by a cosine."""
    vision_lr: float
    """Peak learning rate of the vision tower (0 = frozen)."""


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.monotonic()
    checkpoint = args.out / "checkpoint"
    if args.resume:
        processor, model, done = load_checkpoint(checkpoint)
        tokenizer = processor.tokenizer
        _log(started, f"resumed {checkpoint} after stages {', '.join(done)}")
        if set(STAGE_NAMES) <= set(done):
            return
    else:
        tokenizer = demo_tokenizer(args.seed)
        processor, model, done = demo_processor(tokenizer), demo_model(tokenizer), []
    preprocess = ClipPreprocessor(ProcessorSettings.from_dict(processor.image_processor.to_dict()))
    data = SceneData.generate(args.scenes, preprocess, tokenizer)
    _log(started, f"{args.scenes} scenes rendered and preprocessed")
    rng = np.random.default_rng(args.seed)
    if "vision" not in done:
        train_vision(model, data, Stage("vision", args.vision_steps, 2e-3, 2e-3), 2 * args.batch, rng, started)
    for stage in (Stage("language", args.language_steps, 1e-3, 0.0), Stage("all", args.all_steps, 5e-4, 1e-4)):
        if stage.name not in done:
            train_llava(model, data, stage, args.batch, rng, started)
    # stage 4's batches come from their own generators (the seeds of the shipped run), so that --resume
    # from a stage-3 checkpoint repeats what a run from scratch does
    drills = {"door-open": (args.door_open_steps, (True,), 9), "door": (args.door_steps, (True, False), 4)}
    for name, (steps, polarities, batch_seed) in drills.items():
        if name not in done:
            train_llava(
                model,
                data,
                Stage(name, steps, args.door_lr, args.door_lr / 5),
                args.batch,
                np.random.default_rng([args.seed, batch_seed]),
                started,
                batch_of=functools.partial(door_drill_batch, polarities=polarities),
            )
    with staged_output_dir(checkpoint, overwrite=True) as staging:
        processor.save_pretrained(staging)
        model.save_pretrained(staging)
        (staging / STAGES_FILE).write_text(json.dumps(list(STAGE_NAMES)) + "\n")
    export_model(str(checkpoint), args.out / "openvino-int8", weight_format="int8", overwrite=True)
    _log(started, f"wrote {checkpoint} and {args.out / 'openvino-int8'}")


def load_checkpoint(checkpoint: pathlib.Path):
    """The processor, model and completed stage names of a checkpoint this script wrote."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    done = json.loads((checkpoint / STAGES_FILE).read_text())
    return AutoProcessor.from_pretrained(checkpoint), LlavaForConditionalGeneration.from_pretrained(checkpoint), done


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, tokenizer and batches")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1 is ~3x faster when other work oversubscribes the cores)",
    )
    parser.add_argument("--scenes", type=int, default=10000, help="training scenes (seeds 0..N-1)")
    parser.add_argument(
        "--batch", type=int, default=16, help="images per LLaVA step (the vision stage uses twice as many)"
    )
    parser.add_argument("--vision-steps", type=int, default=1200, help="steps of stage 1 (vision tower)")
    parser.add_argument("--language-steps", type=int, default=500, help="steps of stage 2 (projector + LM)")
    parser.add_argument("--all-steps", type=int, default=900, help="steps of stage 3 (everything)")
    parser.add_argument(
        "--door-open-steps", type=int, default=150, help='steps of stage 4a (door yes/no asked as "is it open?" only)'
    )
    parser.add_argument(
        "--door-steps",
        type=int,
        default=400,
        help='steps of stage 4b (door yes/no asked as "is it open?" and "is it closed?")',
    )
    parser.add_argument(
        "--door-lr", type=float, default=1e-3, help="peak LR of stage 4 (the tower gets 1/5; 5e-4 stayed at the saddle)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help="where checkpoint/ and openvino-int8/ go")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out/checkpoint, running only the stages its training_stages.json lacks",
    )
    return parser.parse_args(argv)


def _log(started: float, message: str) -> None:
    print(f"[{(time.monotonic() - started) / 60:5.1f} min] {message}", flush=True)


# -- the model ------------------------------------------------------------------------------------------


def demo_processor(tokenizer):
    """A LlavaProcessor that squashes the whole frame to 64x64 (no crop: the door is at the edge)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = SHAPES.image_size
    image_processor = CLIPImageProcessor(
        size={"height": side, "width": side},
        do_center_crop=False,
        crop_size={"height": side, "width": side},
        image_mean=testmodels.CLIP_MEAN,
        image_std=testmodels.CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=SHAPES.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=testmodels.CHAT_TEMPLATE,
        image_token=testmodels.IMAGE_TOKEN,
    )


def demo_model(tokenizer):
    """A freshly initialised LlavaForConditionalGeneration whose projector reads the tower's last layer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    vision = CLIPVisionConfig(
        hidden_size=SHAPES.vision_hidden,
        intermediate_size=SHAPES.vision_intermediate,
        num_hidden_layers=SHAPES.vision_layers,
        num_attention_heads=SHAPES.vision_heads,
        image_size=SHAPES.image_size,
        patch_size=SHAPES.patch_size,
        projection_dim=SHAPES.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=SHAPES.text_hidden,
        intermediate_size=SHAPES.text_intermediate,
        num_hidden_layers=SHAPES.text_layers,
        num_attention_heads=SHAPES.text_heads,
        num_key_value_heads=SHAPES.text_kv_heads,
        vocab_size=SHAPES.vocab_size,
        max_position_embeddings=SHAPES.max_positions,
        **special_ids,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(testmodels.IMAGE_TOKEN),
        image_seq_length=testmodels.image_tokens_per_tile(SHAPES),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # a 4-layer tower: the default -2 would leave its last layer unused
        **special_ids,
    )
    return LlavaForConditionalGeneration(config)


# -- the data -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SceneData:
    """Preprocessed training images, their scenes, and the tokenizer's pieces of a conversation."""

    pixels: torch.Tensor  # float16 [N, 3, 64, 64], as the engine's preprocessing gives them
    scenes: list[scenes.SyntheticScene]
    tokenizer: object

    @classmethod
    def generate(cls, count: int, preprocess: ClipPreprocessor, tokenizer) -> "SceneData":
        pixels = torch.empty((count, 3, SHAPES.image_size, SHAPES.image_size), dtype=torch.float16)
        drawn = []
        for seed in range(count):
            rng = np.random.default_rng(seed)
            scene = scenes.random_scene(rng)
            width, height = TRAIN_SIZES[rng.integers(len(TRAIN_SIZES))]
            pixels[seed] = torch.from_numpy(preprocess(scenes.render(scene, width, height, rng)).pixel_values[0])
            drawn.append(scene)
        return cls(pixels, drawn, tokenizer)

    def batch_indices(self, size: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(len(self.scenes), size=size)


def attribute_targets(batch: list[scenes.SyntheticScene]) -> dict[str, torch.Tensor]:
    colours = list(scenes.COLOURS)
    return {
        "door": torch.tensor([int(s.door_open) for s in batch]),
        "people": torch.tensor([s.people for s in batch]),
        "cup": torch.tensor([colours.index(s.cup_colour) for s in batch]),
        "bag": torch.tensor([0 if s.bag_colour is None else 1 + colours.index(s.bag_colour) for s in batch]),
    }


def chat_pieces(tokenizer, turns: list[scenes.Asked]) -> list[tuple[str, bool]]:
    """A multi-turn chat about one image as (text, is_answer) pieces, cut from the chat template's own
    rendering, so the prompts are exactly what the engine sends; the image comes with the first question."""
    messages, pieces, rendered = [], [], ""
    for index, asked in enumerate(turns):
        content = [{"type": "text", "text": build_prompt(asked.question)}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": asked.answer_text}]})
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        pieces += [(prompt[len(rendered) :], False), (full[len(prompt) :], True)]
        rendered = full
    return pieces


def conversation_ids(tokenizer, turns: list[scenes.Asked]) -> tuple[list[int], list[int]]:
    """BOS and the chat's token ids with the image placeholder expanded; labels are -100 except on answers."""
    ids, labels = [tokenizer.bos_token_id], [-100]
    for text, is_answer in chat_pieces(tokenizer, turns):
        piece = _encode(tokenizer, text)
        ids += piece
        labels += piece if is_answer else [-100] * len(piece)
    return ids, labels


def demo_tokenizer(seed: int):
    """The test-model tokenizer retrained on the demo's chats (plus its generic corpus), so prompt words
    are single tokens: sequences are ~2x shorter than with the generic vocabulary, and training 2x faster."""
    base = testmodels.train_tokenizer(SHAPES, seed)
    rng = np.random.default_rng(seed)

    def corpus():
        for _ in range(3000):
            chat = chat_pieces(base, scenes.questions_for(scenes.random_scene(rng), rng))
            yield "".join(text for text, _ in chat)
        yield from testmodels.synthetic_corpus(seed, SHAPES.corpus_lines)

    tokenizer = base.train_new_from_iterator(corpus(), vocab_size=SHAPES.vocab_size)
    tokenizer.chat_template = testmodels.CHAT_TEMPLATE
    return tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(testmodels.IMAGE_TOKEN)
    expanded = []
    for token in ids:
        expanded += [image_id] * testmodels.image_tokens_per_tile(SHAPES) if token == image_id else [token]
    return expanded


def llava_batch(data: SceneData, indices: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Every fact of each scene asked once, in random order."""
    chats = []
    for index in indices:
        turns = scenes.questions_for(data.scenes[index], rng)
        rng.shuffle(turns)
        chats.append(turns)
    return padded_batch(data, indices, chats)


def door_yes_no(scene: scenes.SyntheticScene, polarity_open: bool, rng: np.random.Generator) -> scenes.Asked:
    """A door yes/no question asking whether the door is open (polarity_open) or closed, with its truth."""
    phrasings = scenes.DOOR_OPEN_QUESTIONS if polarity_open else scenes.DOOR_CLOSED_QUESTIONS
    text = phrasings[rng.integers(len(phrasings))]
    return scenes.Asked(Question(id="door", question=text, type="yes_no"), scene.door_open == polarity_open, "door")


def door_drill_batch(
    data: SceneData, indices: np.ndarray, rng: np.random.Generator, polarities: tuple[bool, ...]
) -> dict[str, torch.Tensor]:
    """Stage 4's chats: each image's usual questions plus a door yes/no question, once per polarity (True:
    "is it open?", False: "is it closed?"); usual door yes/no questions of other polarities are left out."""
    chats, images = [], []
    for index in indices[: len(indices) // len(polarities)]:
        scene = data.scenes[index]
        for polarity in polarities:
            usual = [
                asked
                for asked in scenes.questions_for(scene, rng)
                if _door_polarity(scene, asked) in (None, *polarities)
            ]
            turns = usual + [door_yes_no(scene, polarity, rng)]
            rng.shuffle(turns)
            chats.append(turns)
            images.append(index)
    return padded_batch(data, np.array(images), chats)


def _door_polarity(scene: scenes.SyntheticScene, asked: scenes.Asked) -> bool | None:
    """True for "is the door open?", False for "is the door closed?", None for any other question."""
    if asked.topic != "door" or asked.question.type != "yes_no":
        return None
    return asked.truth == scene.door_open


def padded_batch(data: SceneData, indices: np.ndarray, chats: list[list[scenes.Asked]]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels of one chat per image, with the images' pixels."""
    rows = [conversation_ids(data.tokenizer, turns) for turns in chats]
    length = max(len(ids) for ids, _ in rows)
    pad = data.tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (length - len(labels)) for _, labels in rows]),
        "pixel_values": data.pixels[indices].float(),
    }


# -- the stages -----------------------------------------------------------------------------------------


class AttributeHeads(nn.Module):
    """One learned query per scene fact attends over the tower's patch tokens, then a linear classifier."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(len(ATTRIBUTES), width) * 0.02)
        self.attention = nn.MultiheadAttention(width, num_heads=4, batch_first=True)
        self.classifiers = nn.ModuleDict({name: nn.Linear(width, n) for name, n in ATTRIBUTES.items()})

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.norm(patches)
        queries = self.queries.expand(len(patches), -1, -1)
        pooled, _ = self.attention(queries, tokens, tokens)
        return {name: head(pooled[:, i]) for i, (name, head) in enumerate(self.classifiers.items())}


def train_vision(model, data: SceneData, stage: Stage, batch: int, rng: np.random.Generator, started: float) -> None:
    """Stage 1: the vision tower learns to see the scene facts, read from its last layer's patch tokens."""
    tower = model.model.vision_tower
    heads = AttributeHeads(SHAPES.vision_hidden)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=stage.lr, weight_decay=0.01)
    tower.train()
    for step in range(stage.steps):
        indices = data.batch_indices(batch, rng)
        patches = tower(data.pixels[indices].float()).last_hidden_state[:, 1:]
        logits = heads(patches)
        targets = attribute_targets([data.scenes[i] for i in indices])
        loss = sum(nn.functional.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
        _step(optimizer, loss, stage, step)
        if step % 100 == 0 or step == stage.steps - 1:
            accuracy = {name: (logits[name].argmax(-1) == targets[name]).float().mean().item() for name in ATTRIBUTES}
            _log(
                started,
                f"{stage.name} {step}/{stage.steps} loss {loss.item():.3f} "
                + " ".join(f"{name} {value:.2f}" for name, value in accuracy.items()),
            )


def train_llava(
    model, data: SceneData, stage: Stage, batch: int, rng: np.random.Generator, started: float, batch_of=llava_batch
) -> None:
    """Stages 2 to 4: next-token loss on the answers of multi-turn chats about each image, drawn by
    `batch_of(data, indices, rng)`."""
    tower = model.model.vision_tower
    tower.requires_grad_(stage.vision_lr > 0)
    rest = [p for name, p in model.named_parameters() if not name.startswith("model.vision_tower.")]
    groups = [{"params": rest, "lr": stage.lr, "peak": stage.lr}]
    if stage.vision_lr > 0:
        groups.append({"params": list(tower.parameters()), "lr": stage.vision_lr, "peak": stage.vision_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    model.train()
    for step in range(stage.steps):
        loss = model(**batch_of(data, data.batch_indices(batch, rng), rng)).loss
        _step(optimizer, loss, stage, step)
        if step % 50 == 0 or step == stage.steps - 1:
            _log(started, f"{stage.name} {step}/{stage.steps} loss {loss.item():.4f}")
    model.eval()


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, stage: Stage, step: int) -> None:
    """Backward, clip, and set every group's learning rate: linear warm-up, then cosine decay to zero."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nn.utils.clip_grad_norm_(params, 1.0)
    scale = _schedule(step, stage.steps)
    for group in optimizer.param_groups:
        group["lr"] = group.get("peak", stage.lr) * scale
    optimizer.step()


def _schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first 5% of the steps, then a cosine down to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


if __name__ == "__main__":
    main()
