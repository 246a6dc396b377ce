"""Int8 activations for the compressed matmuls: in groups as large as the weights allow, on CPUs without AMX.

Exported models keep their matmul weights at int8 or int4, and OpenVINO's CPU plugin decompresses them
inside the matmul. With `DYNAMIC_QUANTIZATION_GROUP_SIZE` set it also quantizes each token's activations to
int8 on the fly, one scale per group of that many input channels, and multiplies with VNNI int8 dot
products. Its default group of 32 channels spends most of the int8 gain on rescaling each group's partial
sums, so on CPUs with VNNI and without AMX the engine asks for groups of `GROUP`. CPUs with AMX keep the
plugin's defaults: there it computes in bf16 tiles, where the group changes nothing, and int8 activations
would need f32 inference (docs/ARCHITECTURE.md, "Arithmetic on the CPU"; measured in benchmarks/RESULTS.md).

The group divides every weight group of the graph: NNCF's int4 groups (128 by default, smaller for small
layers) and, to be safe, the input width of per-channel int8 weights, since the plugin runs no int8
activations with a group that does not divide the weights' group.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import openvino as ov

GROUP = 128
"""Channels per activation scale when the weights allow it: a quarter of the default's rescalings, and as large
as NNCF's default int4 group."""
SIMD_CHANNELS = 16
"""The plugin only quantizes in groups that are a multiple of this (one AVX-512 register of f32)."""
COMPRESSED_WEIGHT_TYPES = ("u4", "i4", "u8", "i8", "nf4")
CPU_INFO = Path("/proc/cpuinfo")


def activation_group(graph: ov.Model, cpu_flags: frozenset[str] | None = None) -> int | None:
    """The dynamic-quantization group to compile `graph` with on this CPU, or None to keep the plugin's default.

    None when the CPU has AMX or lacks VNNI, when the graph holds no compressed matmul weights, or when its
    weight groups leave no group the plugin accepts.
    """
    flags = cpu_flags if cpu_flags is not None else host_cpu_flags()
    if any(flag.startswith("amx") for flag in flags) or not {"avx512_vnni", "avx_vnni"} & flags:
        return None
    widths = weight_group_widths(graph)
    if not widths:
        return None
    group = math.gcd(GROUP, *widths)
    return group if group % SIMD_CHANNELS == 0 else None


def weight_group_widths(graph: ov.Model) -> set[int]:
    """Input channels per scale of every compressed matmul weight: the group of grouped weights ([N, G, group]),
    the whole input width of per-channel ones ([N, K]).

    Compressed weights are low-precision constants decompressed by a Convert. Their zero points and scales
    ([N, G, 1]) and 4-D convolution kernels are not matmul weights and do not count.
    """
    widths = set()
    for node in graph.get_ops():
        if node.get_type_name() != "Constant" or node.get_element_type().get_type_name() not in COMPRESSED_WEIGHT_TYPES:
            continue
        if not any(target.get_node().get_type_name() == "Convert" for target in node.output(0).get_target_inputs()):
            continue
        shape = list(node.get_output_shape(0))
        if len(shape) in (2, 3) and shape[-1] > 1:
            widths.add(shape[-1])
    return widths


@functools.lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (Linux), empty where they cannot be read."""
    try:
        text = CPU_INFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()
