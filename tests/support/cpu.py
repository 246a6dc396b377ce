"""The CPU flag sets of real machines, and helpers for the tests of the engine's per-CPU compile settings."""

from __future__ import annotations

import numpy as np
import openvino as ov

AVX512_VNNI_BF16 = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})  # e.g. AMD EPYC (Zen 4/5)
WITH_AMX = AVX512_VNNI_BF16 | {"amx_bf16", "amx_int8", "amx_tile"}  # Intel Xeon, 4th generation and later


def submodel_graph(model_dir, submodel: str) -> ov.Model:
    """One exported submodel's graph, e.g. "language_model" or "vision_embeddings_model"."""
    return ov.Core().read_model(model_dir / f"openvino_{submodel}.xml")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
