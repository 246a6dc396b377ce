"""Random-weight LLaVA checkpoints: reproducible, loadable by transformers, and usable like real ones."""

import json

import numpy as np
import pytest
from PIL import Image

from edge_agent.cli import build_parser
from edge_agent.devtools.testmodels import (
    PRESETS,
    SPECIAL_TOKENS,
    build_test_model,
    image_tokens_per_tile,
    language_config,
    train_tokenizer,
)
from edge_agent.errors import UserError

QUESTIONS = ("How many people are there?", "Is the door open?", "What colour is the cup?")


def random_images(count, height=48, width=64):
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def user_turn(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def load(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint), AutoModelForImageTextToText.from_pretrained(checkpoint)


def greedy_answer(processor, model, image, question, new_tokens=6):
    prompt = processor.apply_chat_template(user_turn(question), add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tuple(output[0, inputs["input_ids"].shape[1] :].tolist())


def test_the_same_seed_writes_identical_files_and_another_seed_other_weights(tmp_path):
    first = build_test_model(tmp_path / "first", seed=3)
    second = build_test_model(tmp_path / "second", seed=3)
    other = build_test_model(tmp_path / "other", seed=4)

    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_greedy_answers_differ_across_images_and_questions(tiny_llava_checkpoint):
    processor, model = load(tiny_llava_checkpoint)
    answers = {greedy_answer(processor, model, image, question) for image in random_images(3) for question in QUESTIONS}
    assert len(answers) >= 7, answers


def test_llava_next_tiles_images_into_several_crops_and_generates(tiny_llava_next_checkpoint):
    processor, model = load(tiny_llava_next_checkpoint)
    wide_image = random_images(1, height=32, width=96)[0]
    prompt = processor.apply_chat_template(user_turn("Is the door open?"), add_generation_prompt=True)
    inputs = processor(images=wide_image, text=prompt, return_tensors="pt")

    crops = inputs["pixel_values"].shape[1]
    assert crops > 2  # the base image plus the anyres tiles
    image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert image_tokens > image_tokens_per_tile(PRESETS["tiny"]) * 2
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


def test_config_declares_the_image_token_count_the_processor_inserts(tiny_llava_checkpoint):
    processor, _ = load(tiny_llava_checkpoint)
    config = json.loads((tiny_llava_checkpoint / "config.json").read_text())
    prompt = processor.apply_chat_template(user_turn("Any cups?"), add_generation_prompt=True)
    inputs = processor(images=random_images(1)[0], text=prompt, return_tensors="pt")

    assert int((inputs["input_ids"] == config["image_token_index"]).sum()) == config["image_seq_length"] == 16
    assert config["pad_token_id"] == config["text_config"]["pad_token_id"] == 3


def test_chat_template_follows_llava_1_5(tiny_llava_checkpoint):
    processor, _ = load(tiny_llava_checkpoint)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        *user_turn("Is the door open?"),
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        {"role": "user", "content": "And the window?"},
    ]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == (
        "Answer briefly. USER: <image>\nIs the door open? ASSISTANT: yes </s>USER: And the window? ASSISTANT:"
    )
    assert (tiny_llava_checkpoint / "chat_template.jinja").is_file()


def test_tokenizer_round_trips_text_and_keeps_specials_whole(tiny_llava_checkpoint):
    processor, _ = load(tiny_llava_checkpoint)
    tokenizer = processor.tokenizer
    text = "How many CUPS are on the desk? Ünïcode 3.14 ✓"

    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [SPECIAL_TOKENS.index("<image>")]
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == SPECIAL_TOKENS[:4]


def test_bench_tokenizer_covers_the_whole_32000_token_vocabulary():
    tokenizer = train_tokenizer(PRESETS["bench"], seed=0)
    assert len(tokenizer) == 32000
    assert all(tokenizer.decode([token_id]) for token_id in (5, 1000, 31999))


@pytest.mark.parametrize(("option", "value"), [("arch", "llava_onevision"), ("preset", "huge")])
def test_unknown_arch_or_preset_is_a_user_error(tmp_path, option, value):
    with pytest.raises(UserError, match=option):
        build_test_model(tmp_path / "model", **{option: value})


DEPLOYED_LAYOUTS = {  # query heads, key/value heads, head size of the language models people deploy
    "llava-1.5-7b": (32, 32, 128),
    "llava-next-mistral-7b": (32, 8, 128),
    "llava-interleave-qwen-0.5b": (14, 2, 64),
}
VISION_FIELDS = ("image_size", "patch_size", "vision_hidden", "vision_intermediate", "vision_layers", "vision_heads")


@pytest.mark.parametrize("preset", DEPLOYED_LAYOUTS)
def test_deployed_presets_have_the_real_attention_layout_and_the_bench_vision_tower(preset):
    config = language_config(PRESETS[preset])
    heads, kv_heads, head_size = DEPLOYED_LAYOUTS[preset]

    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (heads, kv_heads, head_size)
    assert config.hidden_size == heads * head_size
    for field in VISION_FIELDS:
        assert getattr(PRESETS[preset], field) == getattr(PRESETS["bench"], field), field


def test_the_grouped_test_preset_writes_qwen2_heads_into_the_checkpoint(tiny_grouped_llava_checkpoint):
    text = json.loads((tiny_grouped_llava_checkpoint / "config.json").read_text())["text_config"]
    heads, kv_heads, head_size = DEPLOYED_LAYOUTS["llava-interleave-qwen-0.5b"]

    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (heads, kv_heads)
    assert text["hidden_size"] // text["num_attention_heads"] == head_size


@pytest.mark.parametrize("preset", PRESETS)
def test_build_test_accepts_every_preset(preset):
    assert build_parser().parse_args(["model", "build-test", "out", "--preset", preset]).preset == preset
