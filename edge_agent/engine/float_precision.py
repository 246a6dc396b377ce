"""f32 arithmetic instead of the CPU plugin's bf16 default on Intel CPUs with AVX-512 BF16 but no AMX.

The plugin computes in bf16 on every CPU with bf16 instructions. Whether that is faster depends on the
core. On AMD's Zen 4 (the 2-core EPYC of benchmarks/RESULTS.md) its bf16 matmuls reached 755 GFLOP/s. On
an Intel Xeon whose AMX the hypervisor hides (AVX-512 with VNNI, BF16 and FP16) a 2048^3 matmul ran at
148 GFLOP/s in bf16 against 190 in f32: Intel's cores issue the AVX-512 BF16 dot product on fewer ports
than f32 multiply-adds, and the plugin converts every activation on the way in and out. The same holds
for Cooper Lake, the Xeon generation with AVX-512 BF16 and no AMX. With AMX the bf16 tile kernels are the
fast path, and those CPUs keep the default.

Only the float parts of the graph move: the compressed matmuls keep their int8 activations
(`int8_activations`). On that Xeon, whole frames of the bench model (4 questions x 16 tokens, two engines
interleaved in one process, medians of 8-10 frames in three runs) took 2.27 against 2.36 s, 2.38 against
2.45 s and 2.37 against 2.44 s, and 1.90 against 2.06 s with one question; the vision encoder alone 3-5%
less. The KV cache then stays in f32 too (`kv_cache`): the plugin's paged attention takes no bf16 cache
under f32 inference, and its u8 default made the frame slower than bf16 (2.48 s in the second run).
"""

from __future__ import annotations

from .int8_activations import host_cpu_flags, host_cpu_vendor

INTEL = "GenuineIntel"


def float_precision(cpu_flags: frozenset[str] | None = None, vendor: str | None = None) -> str | None:
    """`f32` on an Intel CPU with AVX-512 BF16 and no AMX; else None, the plugin's default."""
    flags = cpu_flags if cpu_flags is not None else host_cpu_flags()
    vendor = vendor if vendor is not None else host_cpu_vendor()
    if vendor == INTEL and "avx512_bf16" in flags and not any(flag.startswith("amx") for flag in flags):
        return "f32"
    return None
