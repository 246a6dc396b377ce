"""Minimal reproduction: how fast the CPU plugin reads compressed matmul weights for a few rows, against memory.

One compressed matmul as NNCF exports it (u4 weights, u4 zero points and f16 scales per group of 128 input
channels, decompressed in the graph and fused by the plugin into one FullyConnected), compiled with the
engine's CPU settings (`edge_agent.engine.devices.compile_properties`: int8 activations in groups of 128
where the CPU has VNNI and no AMX). Its weight bytes over its time, with 1, 2 and 4 rows, next to numpy's
read bandwidth measured in the same process, tells whether a decode step's matmuls can reach the bandwidth
roofline at all, and how much one call costs on top (a stack of `--calls` small matmuls with the same bytes
as one large one). Each is timed with one thread and with one per core: a kernel bound by the memory gains
little from a second thread, one bound by its own arithmetic (decompressing the weights) nearly doubles:

    python benchmarks/int4_matmul_repro.py [--shape 4096x14336] [--calls 169] [--bits 8] [--group 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GROUP = 128
ROWS = (1, 2, 4)
ROUNDS = 9
CALLS_PER_ROUND = 10


def compressed_matmuls(k: int, n: int, calls: int, bits: int = 4, group: int = GROUP):
    """`calls` compressed matmuls [rows, k] x [k, n] of one input, their outputs concatenated, as NNCF's
    asymmetric export decompresses them: `bits`-bit weights with one zero point and scale per `group` input
    channels (0: per output channel)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    rows = ops.parameter([-1, k], ov.Type.f32, name="x")
    element = ov.Type.u4 if bits == 4 else ov.Type.u8
    group = group or k
    products = []
    for _ in range(calls):
        weights = ops.constant(rng.integers(0, 2**bits, (n, k // group, group)).astype(np.uint8), element)
        zero_points = ops.constant(np.full((n, k // group, 1), 2 ** (bits - 1), np.uint8), element)
        scales = ops.constant(rng.random((n, k // group, 1)).astype(np.float16) * 0.01)
        centered = ops.subtract(ops.convert(weights, ov.Type.f16), ops.convert(zero_points, ov.Type.f16))
        decompressed = ops.reshape(ops.multiply(centered, scales), [n, k], False)
        products.append(ops.matmul(rows, ops.convert(decompressed, ov.Type.f32), False, True))
    output = products[0] if calls == 1 else ops.concat(products, 1)
    return ov.Model([output], [rows])


def interleaved_ms(requests: dict, k: int) -> dict:
    """{(label, rows): median ms per call}: every request with every row count in turn, round after round,
    so that a neighbour on the machine or a change of clock slows them alike."""
    inputs = {rows: np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32) for rows in ROWS}
    times = {(label, rows): [] for label in requests for rows in ROWS}
    for _ in range(ROUNDS):
        for label, request in requests.items():
            for rows, data in inputs.items():
                request.infer([data])
                started = time.perf_counter()
                for _ in range(CALLS_PER_ROUND):
                    request.infer([data])
                times[label, rows].append((time.perf_counter() - started) / CALLS_PER_ROUND * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    import openvino as ov

    from benchmarks.run_benchmarks import copy_bandwidth_gbs, read_bandwidth_gbs
    from edge_agent.engine.devices import compile_properties

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x14336", help="k x n of the large matmul")
    parser.add_argument("--calls", type=int, default=16, help="small matmuls over the same bytes")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--group", type=int, default=GROUP, help="input channels per scale (0: per channel)")
    args = parser.parse_args(argv)
    k, n = (int(side) for side in args.shape.split("x"))
    core = ov.Core()
    small_n = max(GROUP, n // args.calls // GROUP * GROUP)
    graphs = {
        "1 call": compressed_matmuls(k, n, 1, args.bits, args.group),
        f"{args.calls} calls": compressed_matmuls(k, small_n, args.calls, args.bits, args.group),
    }
    requests = {
        f"{label}, {threads} thread(s)": core.compile_model(
            graph, "CPU", {**compile_properties("CPU", None, graph), "INFERENCE_NUM_THREADS": threads}
        ).create_infer_request()
        for label, graph in graphs.items()
        for threads in sorted({1, os.cpu_count()})
    }
    weight_mb = k * n * args.bits / 8 / 1e6
    copy, read = copy_bandwidth_gbs(), read_bandwidth_gbs()
    print(
        f"copy bandwidth {copy:.1f} GB/s (read + write), read bandwidth {read:.1f} GB/s; {args.bits}-bit "
        f"weights, groups of {args.group or k}: {weight_mb:.1f} MB in 1 or {args.calls} calls; medians of "
        f"{ROUNDS} interleaved rounds"
    )
    for (label, rows), ms in interleaved_ms(requests, k).items():
        rate = weight_mb / ms
        print(f"{label}, {rows} rows: {ms:.2f} ms, {rate:.1f} GB/s ({rate / read:.0%} of the read bandwidth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
