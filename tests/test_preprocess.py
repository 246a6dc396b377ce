"""Frames become the same pixel values the model's Hugging Face processor computes (Pillow resampling)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_agent.engine.preprocess import AnyresPreprocessor, ClipPreprocessor, ProcessorSettings
from edge_agent.engine.resample import pil_resize

SIZES = [(480, 640), (640, 480), (100, 37), (37, 100), (1080, 1920), (20, 20), (336, 336), (7, 500)]
GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def frame(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(height * 7919 + width)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def pil_rgb(frame_bgr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(frame_bgr[:, :, ::-1]))


@pytest.mark.parametrize("resample", [2, 3], ids=["bilinear", "bicubic"])
def test_resize_is_bit_exact_with_pillow(resample):
    rng = np.random.default_rng(resample)
    for _ in range(60):
        height, width = rng.integers(1, 600, 2)
        out_h, out_w = rng.integers(1, 400, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(image).resize((int(out_w), int(out_h)), resample=resample))
        assert np.array_equal(pil_resize(image, int(out_h), int(out_w), resample), expected), (height, width)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_preprocessing_matches_clip_image_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ours = ClipPreprocessor(ProcessorSettings.from_dict(reference.to_dict()))
    image = frame(*size)
    expected = reference(pil_rgb(image), return_tensors="np")["pixel_values"]
    prepared = ours(image)
    assert prepared.pixel_values.shape == expected.shape
    np.testing.assert_allclose(prepared.pixel_values, expected, atol=1e-4)
    assert prepared.image_size == size


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_next_anyres_tiles_match_llava_next_image_processor(size):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    reference = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=GRID
    )
    ours = AnyresPreprocessor(ProcessorSettings.from_dict(reference.to_dict()))
    image = frame(*size)
    expected = reference(pil_rgb(image), return_tensors="np")["pixel_values"][0]
    prepared = ours(image)
    assert prepared.pixel_values.shape == expected.shape
    np.testing.assert_allclose(prepared.pixel_values, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_exported_model_preprocessing_matches_its_checkpoint_processor(request, arch):
    """The settings the engine reads from an export reproduce the checkpoint's own processor."""
    from edge_agent.engine import Engine

    engine = Engine.load(request.getfixturevalue(f"tiny_{arch}_fp32"))
    reference = request.getfixturevalue(f"hf_{arch}")
    for size in [(48, 64), (64, 48), (100, 37)]:
        image = frame(*size)
        np.testing.assert_allclose(engine.preprocess(image).pixel_values, reference.pixel_values(image), atol=1e-4)


def test_grayscale_frames_are_expanded_to_three_channels():
    settings = ProcessorSettings.from_dict(
        {
            "size": {"shortest_edge": 32},
            "crop_size": {"height": 32, "width": 32},
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        }
    )
    gray = frame(40, 50)[:, :, 0]
    color = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(ClipPreprocessor(settings)(gray).pixel_values, ClipPreprocessor(settings)(color).pixel_values)


@pytest.mark.parametrize(
    "raw, shape",
    [
        ({"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 28}}, (30, 28)),
        ({"size": {"height": 24, "width": 40}, "do_center_crop": False}, (24, 40)),
        ({"size": {"shortest_edge": 32}, "do_center_crop": False}, None),
    ],
)
def test_the_tile_shape_is_fixed_only_where_every_frame_gives_it(raw, shape):
    """The engine compiles the vision encoder for this shape; None keeps it dynamic."""
    preprocess = ClipPreprocessor(ProcessorSettings.from_dict({**raw, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert preprocess.tile_shape == shape
    tiles = {preprocess(frame(*size)).pixel_values.shape[-2:] for size in SIZES[:4]}
    assert tiles == {shape} if shape else len(tiles) > 1


def test_anyres_tiles_are_square_whatever_the_processor_crops():
    settings = ProcessorSettings.from_dict(
        {
            "size": {"shortest_edge": 32},
            "do_center_crop": False,
            "image_grid_pinpoints": [[32, 64], [64, 32]],
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        }
    )
    preprocess = AnyresPreprocessor(settings)
    assert preprocess.tile_shape == (32, 32)
    for size in SIZES[:4]:
        assert preprocess(frame(*size)).pixel_values.shape[-2:] == (32, 32)
