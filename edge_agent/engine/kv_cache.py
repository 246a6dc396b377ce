"""The language model's KV cache in bf16 instead of the CPU plugin's u8, on CPUs with bf16 arithmetic.

The plugin compresses the KV cache to u8 by default (one scale and zero point per token and head) and
dequantizes it inside attention. Its decode attention handles several new tokens with one dot product
per token, head and cached position, and dequantizes the cached key and value again for each of them. The
engine decodes every answer of a frame in the same step, over the frame's shared prefix, so that cost grows
with the number of answers. On a 2-core AMD EPYC (AVX-512 with BF16) a bf16 cache made the bench model's
decode 15% faster for 4 answers (15 steps in 259 instead of 305 ms) and 14% for 8 (413 instead of 480
ms), and left one answer's steps as they were (medians of 8 frames, interleaved). It takes twice the
memory of a u8 cache: 34 instead of 17 MB for the bench model's 700 tokens, about 370 instead of 180 MB
for LLaVA-1.5-7B's. Nothing is lost: on such CPUs the plugin computes in bf16 by default, so the keys and
values are bf16 before they are cached. CPUs without bf16 arithmetic keep the plugin's default.
Those measurements ran the stateful graph; with paged attention (`paged.py`, the engine's on the CPU) a bf16
cache still made steps of 4 and 8 answers 7-9% faster than u8.
"""

from __future__ import annotations

import openvino as ov

from .int8_activations import host_cpu_flags

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def kv_cache_precision(graph: ov.Model, cpu_flags: frozenset[str] | None = None) -> str | None:
    """`bf16` for a graph that keeps a KV cache in its state, on a CPU with bf16 arithmetic; else None."""
    flags = cpu_flags if cpu_flags is not None else host_cpu_flags()
    if not BF16_FLAGS & flags or not graph.get_sinks():
        return None
    return "bf16"
