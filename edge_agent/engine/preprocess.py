"""Camera frame -> the vision encoder's `pixel_values`, as the model's Hugging Face processor computes them.

Two processors cover the supported models:
- `ClipPreprocessor` (llava 1.5): resize the shortest edge, center-crop, rescale, normalize.
- `AnyresPreprocessor` (llava_next): pick the best grid resolution, resize keeping the aspect ratio,
  pad, cut into crop-sized tiles, and prepend the whole frame squashed to one tile ("anyres").
Frames arrive as OpenCV BGR uint8; the processors work in RGB like the training pipeline did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .resample import pil_resize


@dataclass(frozen=True)
class PreparedImage:
    """What the vision encoder needs for one frame."""

    pixel_values: np.ndarray  # float32 [tiles, 3, H, W]
    image_size: tuple[int, int]  # the frame's (height, width) before any resizing


@dataclass(frozen=True)
class ProcessorSettings:
    """The subset of `preprocessor_config.json` that LLaVA processors use."""

    shortest_edge: int | None  # resize the shortest edge to this (keeps aspect ratio) ...
    resize_to: tuple[int, int] | None  # ... or resize to exactly (height, width)
    crop: tuple[int, int] | None  # center crop (height, width), None when the processor does not crop
    resample: int  # Pillow filter id (3 = bicubic)
    rescale_factor: float | None  # usually 1/255; None when the processor does not rescale
    mean: np.ndarray | None  # per-channel normalization, None when the processor does not normalize
    std: np.ndarray | None
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # llava_next: candidate (height, width) resolutions

    @classmethod
    def from_dict(cls, raw: dict) -> "ProcessorSettings":
        size = raw.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = raw.get("crop_size") or {}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        normalize = raw.get("do_normalize", True)
        return cls(
            shortest_edge=size.get("shortest_edge") if raw.get("do_resize", True) else None,
            resize_to=(size["height"], size["width"]) if raw.get("do_resize", True) and "height" in size else None,
            crop=(crop["height"], crop["width"]) if raw.get("do_center_crop", True) and crop else None,
            resample=int(raw.get("resample", 3)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else None,
            mean=np.asarray(raw["image_mean"], dtype=np.float32) if normalize else None,
            std=np.asarray(raw["image_std"], dtype=np.float32) if normalize else None,
            grid_pinpoints=tuple(tuple(p) for p in raw.get("image_grid_pinpoints") or ()),
        )


def to_rgb(frame_bgr: np.ndarray) -> np.ndarray:
    """An OpenCV frame (BGR, or gray) as an RGB uint8 HxWx3 array."""
    if frame_bgr.ndim == 2:
        return np.repeat(frame_bgr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(frame_bgr[:, :, 2::-1])


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Output (height, width) when the shortest edge becomes `shortest` (transformers' rounding)."""
    if width <= height:
        return int(shortest * height / width), shortest
    return shortest, int(shortest * width / height)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop of an HxWxC image, zero-padded where the image is smaller (as transformers does)."""
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    padded_h, padded_w = max(height, image.shape[0]), max(width, image.shape[1])
    pad_top, pad_left = math.ceil((padded_h - image.shape[0]) / 2), math.ceil((padded_w - image.shape[1]) / 2)
    padded = np.zeros((padded_h, padded_w, image.shape[2]), dtype=image.dtype)
    padded[pad_top : pad_top + image.shape[0], pad_left : pad_left + image.shape[1]] = image
    top, left = top + pad_top, left + pad_left
    return padded[top : top + height, left : left + width]


class ClipPreprocessor:
    """CLIP-style processing: one tile per frame."""

    def __init__(self, settings: ProcessorSettings):
        self.settings = settings

    def __call__(self, frame_bgr: np.ndarray) -> PreparedImage:
        rgb = to_rgb(frame_bgr)
        return PreparedImage(self.tile_values(rgb)[None], image_size=rgb.shape[:2])

    @property
    def tile_shape(self) -> tuple[int, int] | None:
        """(height, width) of every tile whatever the frame, or None where it follows the frame's aspect ratio
        (a shortest-edge resize without a crop)."""
        return self.settings.crop or self.settings.resize_to

    def tile_values(self, rgb: np.ndarray) -> np.ndarray:
        """One RGB uint8 image -> float32 [3, H, W] after resize, crop, rescale and normalize."""
        s = self.settings
        image = rgb
        if s.resize_to is not None:
            image = pil_resize(image, *s.resize_to, resample=s.resample)
        elif s.shortest_edge is not None:
            image = pil_resize(image, *shortest_edge_size(*image.shape[:2], s.shortest_edge), resample=s.resample)
        if s.crop is not None:
            image = center_crop(image, *s.crop)
        values = image.astype(np.float32)
        if s.rescale_factor is not None:
            values = (image.astype(np.float64) * s.rescale_factor).astype(np.float32)
        if s.mean is not None:
            values = (values - s.mean) / s.std
        return np.ascontiguousarray(values.transpose(2, 0, 1))


def select_best_resolution(image_size: tuple[int, int], candidates) -> tuple[int, int]:
    """The (height, width) candidate that keeps the most of the image and wastes the least (LLaVA-NeXT)."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_h, cand_w), effective, wasted
    return best


def scaled_size_within(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size of the image scaled to fit `target` with its aspect ratio kept (transformers' rounding)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


class AnyresPreprocessor(ClipPreprocessor):
    """LLaVA-NeXT processing: the squashed whole frame, then the tiles of a best-fit grid."""

    def __init__(self, settings: ProcessorSettings):
        super().__init__(settings)
        if not settings.grid_pinpoints:
            raise ValueError("llava_next preprocessing needs image_grid_pinpoints")
        side = (settings.crop or settings.resize_to or (settings.shortest_edge,))[0]
        self.tile = (side, side)  # transformers cuts square tiles of the crop height

    @property
    def tile_shape(self) -> tuple[int, int]:
        """Square tiles go in, so a shortest-edge resize without a crop keeps them square too."""
        return super().tile_shape or self.tile

    def __call__(self, frame_bgr: np.ndarray) -> PreparedImage:
        rgb = to_rgb(frame_bgr)
        tiles = [self.whole_frame(rgb)] + self.grid_tiles(rgb)
        values = np.stack([self.tile_values(tile) for tile in tiles])
        return PreparedImage(values, image_size=rgb.shape[:2])

    def whole_frame(self, rgb: np.ndarray) -> np.ndarray:
        s = self.settings
        side = s.shortest_edge if s.shortest_edge is not None else s.resize_to
        height, width = (side, side) if isinstance(side, int) else side
        return pil_resize(rgb, height, width, resample=s.resample)

    def grid_tiles(self, rgb: np.ndarray) -> list[np.ndarray]:
        grid_h, grid_w = select_best_resolution(rgb.shape[:2], self.settings.grid_pinpoints)
        new_h, new_w = scaled_size_within(rgb.shape[:2], (grid_h, grid_w))
        resized = pil_resize(rgb, new_h, new_w, resample=self.settings.resample)
        pad_y, pad_x = (grid_h - new_h) // 2, (grid_w - new_w) // 2
        padded = np.zeros((grid_h, grid_w, 3), dtype=np.uint8)
        padded[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
        tile_h, tile_w = self.tile
        return [
            padded[y : y + tile_h, x : x + tile_w] for y in range(0, grid_h, tile_h) for x in range(0, grid_w, tile_w)
        ]
