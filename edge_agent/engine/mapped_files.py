"""Give back the pages of weight files that a device has already copied into its own buffers.

OpenVINO memory-maps a model's `.bin` files (and the compiled blobs of its cache). On a model's first
inference the CPU plugin repacks the weights into buffers of its own layout and afterwards reads the
mapping only for a few small constants, yet the pages it read stay resident: the process holds the
weights twice. `madvise(MADV_DONTNEED)` on a read-only shared file mapping drops its pages from the process and loses
nothing: a later read faults them back in from the page cache or the file.

Dropping them only after the first inference still leaves a moment, at its end, when the whole file and the
whole repacked copy are resident. The plugin reads each weight once, to repack it, so
`mapped_pages_dropped_during` keeps dropping while that inference runs (what each way costs in memory:
docs/ARCHITECTURE.md, "Weights held once").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

MADV_DONTNEED = 4
MAPS = Path("/proc/self/maps")
DROP_EVERY_SECONDS = 0.02
"""How often pages are dropped while a first inference runs: often enough that little of a weight file is
resident beside its repacked copy, rarely enough that the passes over /proc/self/maps cost little."""


@contextlib.contextmanager
def mapped_pages_dropped_during(directories: list[Path], every: float = DROP_EVERY_SECONDS) -> Iterator[None]:
    """Drop the pages of mapped files under `directories` every `every` seconds while the block runs, and once
    more when it ends.

    A helper thread does it, so the block's own code needs no hooks; the inference it wraps releases the GIL.
    """
    stop = threading.Event()

    def keep_dropping() -> None:
        while not stop.wait(every):
            drop_mapped_pages(directories)

    dropper = threading.Thread(target=keep_dropping, name="drop-mapped-pages", daemon=True)
    dropper.start()
    try:
        yield
    finally:
        stop.set()
        dropper.join()
        drop_mapped_pages(directories)


def drop_mapped_pages(directories: list[Path]) -> int:
    """Drop the resident pages of this process's read-only shared mappings of files under `directories`.

    Returns the size of the address ranges dropped in bytes (0 where /proc or madvise is unavailable).
    """
    madvise = _madvise()
    if madvise is None or not MAPS.exists():
        return 0
    roots = [Path(directory).resolve() for directory in directories]
    dropped = 0
    for start, end in read_only_shared_mappings(roots):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def read_only_shared_mappings(roots: list[Path]) -> list[tuple[int, int]]:
    """Address ranges [start, end) of read-only shared mappings of files under `roots`, from /proc/self/maps."""
    ranges = []
    for line in MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1] != "r--s":
            continue
        path = Path(fields[5])
        if any(path.is_relative_to(root) for root in roots):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@functools.cache
def _madvise():
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    madvise = getattr(ctypes.CDLL(library, use_errno=True), "madvise", None)
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    return madvise
