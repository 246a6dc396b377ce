"""The language model's KV cache in bf16 instead of the CPU plugin's u8, on CPUs with bf16 arithmetic.

The plugin compresses the KV cache to u8 by default and its decode attention dequantizes the cached keys and
values again for every new token; the engine decodes all of a frame's answers in one step over their shared
prefix, so that cost grows with the number of answers, and a bf16 cache avoids it for twice the memory
(docs/ARCHITECTURE.md, "Arithmetic on the CPU"; measured in benchmarks/RESULTS.md). Nothing is lost: on
such CPUs the plugin computes in bf16 by default, so keys and values are bf16 before they are cached
(tests/test_kv_cache.py). CPUs without bf16 arithmetic, and graphs without a KV cache in their state, keep
the plugin's default.
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
