"""Device strings are checked against the machine's devices before anything is compiled."""

import pytest

from edge_agent.engine.devices import check_device, compile_properties, physical_devices
from edge_agent.errors import UserError

INTEL_BOX = ["CPU", "GPU.0", "GPU.1", "NPU"]


@pytest.mark.parametrize(
    "device, expected",
    [
        ("CPU", ["CPU"]),
        ("GPU.1", ["GPU.1"]),
        ("AUTO", []),
        ("AUTO:GPU,CPU", ["GPU", "CPU"]),
        ("HETERO:GPU.0,CPU", ["GPU.0", "CPU"]),
    ],
)
def test_virtual_devices_name_their_targets(device, expected):
    assert physical_devices(device) == expected


@pytest.mark.parametrize("device", ["cpu", "GPU", "GPU.1", "AUTO", "AUTO:GPU,CPU", "NPU"])
def test_devices_present_on_an_intel_box_are_accepted_for_the_vision_encoder(device):
    assert check_device(device, "vision encoder", INTEL_BOX) == device.upper()


@pytest.mark.parametrize(
    "device, message",
    [
        ("GPU.2", "device 'GPU.2' for the vision encoder is not available on this machine (available: CPU, GPU.0"),
        ("XPU", "device 'XPU'"),
        ("AUTO:NPU,CPU", "device 'NPU'"),
        ("", "empty device name"),
    ],
)
def test_unknown_devices_are_refused_naming_what_exists(device, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_device(device, "vision encoder", ["CPU", "GPU.0"])


@pytest.mark.parametrize("device", ["NPU", "AUTO:NPU,CPU"])
def test_the_language_model_is_never_placed_on_the_npu(device):
    with pytest.raises(UserError, match="cannot run on the NPU"):
        check_device(device, "language model", INTEL_BOX)


def test_f32_pins_the_cpu_kv_cache_too_and_leaves_other_devices_alone():
    assert compile_properties("CPU", "f32")["KV_CACHE_PRECISION"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in compile_properties("GPU", "f32")
    assert compile_properties("CPU", None) == {"PERFORMANCE_HINT": "LATENCY"}
