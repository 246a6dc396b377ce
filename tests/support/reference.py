"""Hugging Face transformers as the independent reference for the engine's answers and preprocessing."""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import pytest


def random_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A BGR frame with structure (gradients and blocks), not only noise, so resizing matters."""
    rng = np.random.default_rng(seed + height * 1000 + width)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    frame[: height // 2, : width // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return frame


@functools.lru_cache(maxsize=4)
def _hf_model(checkpoint: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    return processor, model


class HfReference:
    """Greedy answers from transformers' `generate(do_sample=False)` for one checkpoint."""

    def __init__(self, checkpoint: pathlib.Path):
        self.processor, self.model = _hf_model(str(checkpoint))

    def inputs(self, frame_bgr: np.ndarray, question: str):
        from PIL import Image

        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        image = Image.fromarray(np.ascontiguousarray(frame_bgr[:, :, ::-1]))
        return self.processor(images=image, text=prompt, return_tensors="pt")

    def answer_ids(self, frame_bgr: np.ndarray, question: str, max_new_tokens: int) -> list[int]:
        """Generated token ids without the end-of-sequence token (the engine reports them that way)."""
        import torch

        inputs = self.inputs(frame_bgr, question)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generated = output[0, inputs["input_ids"].shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        stop_at = next((i for i, token in enumerate(generated) if token in stops), len(generated))
        return generated[:stop_at]

    def pixel_values(self, frame_bgr: np.ndarray) -> np.ndarray:
        values = self.inputs(frame_bgr, "?")["pixel_values"].numpy()
        return values[0] if values.ndim == 5 else values


@pytest.fixture(scope="session")
def hf_llava(tiny_llava_checkpoint) -> HfReference:
    return HfReference(tiny_llava_checkpoint)


@pytest.fixture(scope="session")
def hf_llava_next(tiny_llava_next_checkpoint) -> HfReference:
    return HfReference(tiny_llava_next_checkpoint)


@pytest.fixture(scope="session")
def hf_grouped_llava(tiny_grouped_llava_checkpoint) -> HfReference:
    return HfReference(tiny_grouped_llava_checkpoint)
