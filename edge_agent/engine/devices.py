"""Which OpenVINO device runs each submodel, checked against the devices this machine has.

Device strings follow OpenVINO: `CPU`, `GPU`, `GPU.1`, `NPU`, and the virtual devices `AUTO`, `AUTO:GPU,CPU`,
`HETERO:GPU,CPU`, `MULTI:...`. The language model decodes many questions as one dynamic batch, which the
NPU's static-shape compiler cannot run, so it is refused there with a clear message; the vision encoder
runs on the NPU with a static one-tile shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import openvino as ov

from ..errors import UserError
from .int8_activations import activation_group
from .kv_cache import kv_cache_precision

VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


@dataclass(frozen=True)
class DevicePlan:
    """The device of each submodel (text embeddings follow the language model)."""

    vision: str = "CPU"
    language: str = "CPU"


def physical_devices(device: str) -> list[str]:
    """The real devices a device string names: `AUTO:GPU,CPU` -> [GPU, CPU]; `AUTO` -> []."""
    kind, _, targets = device.partition(":")
    if kind in VIRTUAL_DEVICES:
        return [t.strip() for t in targets.split(",") if t.strip()]
    return [device]


def is_available(name: str, available: list[str]) -> bool:
    """`GPU` matches `GPU.0`; `GPU.1` must match exactly."""
    return name in available or ("." not in name and any(a.split(".")[0] == name for a in available))


def check_device(device: str, role: str, available: list[str]) -> str:
    device = device.strip().upper()
    if not device:
        raise UserError(f"empty device name for the {role}")
    for name in physical_devices(device):
        if not is_available(name, available):
            raise UserError(
                f"device {name!r} for the {role} is not available on this machine "
                f"(available: {', '.join(available) or 'none'})"
            )
    if role == "language model" and "NPU" in physical_devices(device) + [device]:
        raise UserError(
            "the language model cannot run on the NPU (batched decoding needs dynamic shapes); "
            "use CPU or GPU for the language model and keep the NPU for the vision encoder"
        )
    return device


def plan_devices(
    core: ov.Core, device: str = "CPU", vision: str | None = None, language: str | None = None
) -> DevicePlan:
    """Validate the requested devices; per-submodel choices override `device`."""
    available = list(core.available_devices)
    return DevicePlan(
        vision=check_device(vision or device, "vision encoder", available),
        language=check_device(language or device, "language model", available),
    )


def compile_properties(device: str, inference_precision: str | None, graph: ov.Model | None = None) -> dict:
    """Latency-oriented settings: one stream, every core on the one request; optional precision pin.

    On the CPU, `graph`'s compressed matmuls get int8 activations where that is faster (`int8_activations`),
    and a language model's KV cache is kept in bf16 where the CPU computes in bf16 (`kv_cache`; not with an
    f16 pin, whose keys and values bf16 would round).
    Pinning `f32` instead keeps every activation in f32, and the KV cache too (it is u8-compressed by default):
    exact comparisons with a PyTorch reference need that, since the rounding of int8 activations depends on
    how many tokens a call holds.
    """
    properties = {"PERFORMANCE_HINT": "LATENCY"}
    if not device.startswith("CPU"):
        return properties
    if inference_precision:
        properties["INFERENCE_PRECISION_HINT"] = inference_precision
    if inference_precision == "f32":
        properties["KV_CACHE_PRECISION"] = "f32"
        properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    elif graph is not None:
        if group := activation_group(graph):
            properties["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
        if inference_precision in (None, "bf16") and (kv_precision := kv_cache_precision(graph)):
            properties["KV_CACHE_PRECISION"] = kv_precision
    return properties
