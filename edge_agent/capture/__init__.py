"""Capture: OpenCV sources, a reader thread that keeps only the newest frame, and the scene gate."""

from edge_agent.capture.gate import SceneGate
from edge_agent.capture.reader import CameraReader, Frame
from edge_agent.capture.sources import DeviceMissing, validate_source

__all__ = ["CameraReader", "DeviceMissing", "Frame", "SceneGate", "validate_source"]
