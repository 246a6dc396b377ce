"""LLaVA inference on OpenVINO: a frame is encoded once and shared by every question.

Imports only openvino, openvino-tokenizers, numpy and jinja2 (for the model's chat template): never torch,
transformers or optimum.
"""

from .constrained import Prompt
from .engine import Answer, Engine, FrameContext, Timings

__all__ = ["Answer", "Engine", "FrameContext", "Prompt", "Timings"]
