"""Dropping the pages of mapped weight files: only read-only shared mappings under the given directories."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.engine import Engine, Prompt
from edge_agent.engine.mapped_files import drop_mapped_pages, mapped_pages_dropped_during

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")

PAGES = 256


def resident_bytes(directory: Path) -> int:
    """Resident bytes of this process's file mappings under `directory`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and Path(fields[5]).is_relative_to(directory.resolve())
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def mapped_file(path: Path, access: int) -> mmap.mmap:
    """A file of PAGES pages of known bytes, mapped with `access` and read through, so all of it is resident."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.arange(PAGES * mmap.PAGESIZE, dtype=np.uint8).tobytes())
    with path.open("r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=access)
    assert sum(mapping[offset] for offset in range(0, len(mapping), mmap.PAGESIZE)) >= 0  # touch every page
    return mapping


def test_read_only_mappings_under_the_directories_lose_their_pages_and_keep_their_bytes(tmp_path):
    mapping = mapped_file(tmp_path / "weights" / "model.bin", mmap.ACCESS_READ)
    assert resident_bytes(tmp_path / "weights") == PAGES * mmap.PAGESIZE
    assert drop_mapped_pages([tmp_path / "weights"]) >= PAGES * mmap.PAGESIZE
    assert resident_bytes(tmp_path / "weights") == 0
    assert mapping[:] == (tmp_path / "weights" / "model.bin").read_bytes()  # faulted back in, unchanged
    mapping.close()


def test_writable_mappings_and_other_directories_are_left_alone(tmp_path):
    writable = mapped_file(tmp_path / "weights" / "scratch.bin", mmap.ACCESS_WRITE)
    elsewhere = mapped_file(tmp_path / "other" / "model.bin", mmap.ACCESS_READ)
    writable[0] = 255
    assert drop_mapped_pages([tmp_path / "weights"]) == 0
    assert resident_bytes(tmp_path / "weights") == PAGES * mmap.PAGESIZE
    assert resident_bytes(tmp_path / "other") == PAGES * mmap.PAGESIZE
    assert writable[0] == 255
    writable.close()
    elsewhere.close()


def test_pages_are_dropped_while_the_block_runs_not_only_at_its_end(tmp_path):
    """A first inference reads each weight once: pages it has read go while it still runs."""
    directory = tmp_path / "weights"
    mapping = mapped_file(directory / "model.bin", mmap.ACCESS_READ)
    with mapped_pages_dropped_during([directory], every=0.01):
        deadline = time.monotonic() + 5.0
        while resident_bytes(directory) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident_bytes(directory) == 0
        assert mapping[:] == (directory / "model.bin").read_bytes()  # read again inside the block
    assert resident_bytes(directory) == 0  # and dropped once more at its end
    mapping.close()


def test_the_engine_lets_go_of_its_mapped_model_files_after_the_first_answer(tiny_llava_fp32):
    engine = Engine.load(tiny_llava_fp32, inference_precision="f32")
    frame = np.full((120, 160, 3), 90, np.uint8)
    first = engine.answer(engine.encode(frame), [Prompt("What is in the picture?", 6)])
    left = resident_bytes(Path(tiny_llava_fp32))
    again = engine.answer(engine.encode(frame), [Prompt("What is in the picture?", 6)])
    model_files = sum(path.stat().st_size for path in Path(tiny_llava_fp32).glob("*.bin"))
    assert left < model_files / 10
    assert [answer.token_ids for answer in again] == [answer.token_ids for answer in first]


def test_the_engine_lets_go_of_the_vision_encoders_files_as_it_compiles_it(tiny_llava_fp32):
    """Compiled for static tiles, the encoder is repacked by the compile itself, before any inference."""
    engine = Engine.load(tiny_llava_fp32, inference_precision="f32")
    weights = Path(tiny_llava_fp32) / "openvino_vision_embeddings_model.bin"
    assert resident_bytes(weights) < weights.stat().st_size / 10
    assert engine.encode(np.full((120, 160, 3), 90, np.uint8)).image_tokens > 0
