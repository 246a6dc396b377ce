"""Vision-encoder output -> the sequence of image embeddings the language model reads.

llava: one tile, its features as they are. llava_next ("anyres"): the whole-frame tile first, then the grid
tiles stitched back into one feature map, the padding added by preprocessing cut away ("unpadding"), and
the model's `image_newline` embedding appended after every row, as transformers' `pack_image_features` does.
"""

from __future__ import annotations

import numpy as np

from .preprocess import select_best_resolution


def unpad(features: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Crop a [C, H, W] feature map to the area the (aspect-preserving, centered) frame occupied."""
    height, width = image_size
    current_h, current_w = features.shape[1:]
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        pad = (current_h - new_h) // 2
        return features[:, pad : current_h - pad, :]
    new_w = int(round(width * (current_h / height), 7))
    pad = (current_w - new_w) // 2
    return features[:, :, pad : current_w - pad]


def pack_anyres(
    features: np.ndarray,
    image_size: tuple[int, int],
    grid_pinpoints,
    tile_px: int,
    patches_per_side: int,
    image_newline: np.ndarray | None,
) -> np.ndarray:
    """[tiles, patches, hidden] for one frame -> [image_tokens, hidden] (LLaVA-NeXT packing)."""
    whole, tiles = features[0], features[1:]
    if len(tiles) == 0:
        return whole if image_newline is None else np.concatenate([whole, image_newline[None]], axis=0)
    grid_h, grid_w = select_best_resolution(image_size, grid_pinpoints)
    rows, cols = grid_h // tile_px, grid_w // tile_px
    side = patches_per_side
    grid = tiles.reshape(rows, cols, side, side, -1)
    feature_map = grid.transpose(4, 0, 2, 1, 3).reshape(grid.shape[-1], rows * side, cols * side)
    feature_map = unpad(feature_map, image_size)
    if image_newline is not None:
        newline_column = np.broadcast_to(image_newline[:, None, None], feature_map.shape[:2] + (1,))
        feature_map = np.concatenate([feature_map, newline_column], axis=2)
    packed = feature_map.reshape(feature_map.shape[0], -1).T
    return np.concatenate([whole, packed], axis=0)
