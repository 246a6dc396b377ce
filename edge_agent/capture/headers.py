"""Image sizes read from file headers, so that a decompression bomb is refused before OpenCV decodes it.

A flat 20000 x 20000 PNG is 1.2 MB on disk and 1.2 GB decoded. `cv2.imdecode` allocates the whole image
as soon as it has read the header, and its own limit (`OPENCV_IO_MAX_IMAGE_PIXELS`, 1 GP by default) is
read once when cv2 is loaded, so the size is checked here first.

OpenCV picks its decoder by the file's signature, not its name: `image_size` reads the header of every
format an image folder may hold (PNG, JPEG, BMP, WebP, TIFF, PGM/PPM) and returns None for any other
signature, which the caller then must not decode.
"""

from __future__ import annotations

import re
import struct

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
"""JPEG markers without a length field (TEM and the restart markers)."""
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers of every JPEG coding (0xC4, 0xC8, 0xCC are tables and a reserved marker)."""
JPEG_START_OF_SCAN = 0xDA
PNM_NUMBER = re.compile(rb"(?:\s|#[^\r\n]*)*(\d+)")
"""One header number of a PGM/PPM file, after whitespace and `#` comments."""
TIFF_WIDTH, TIFF_HEIGHT = 256, 257
TIFF_VALUE_FORMATS = {3: "H", 4: "I"}
"""struct formats of the TIFF field types a size may have (SHORT, LONG)."""


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the image in `data` from its header, or None if the header is no format read here."""
    readers = {
        PNG_SIGNATURE: _png_size,
        b"\xff\xd8": _jpeg_size,
        b"BM": _bmp_size,
        b"RIFF": _webp_size,
        b"II*\0": _tiff_size,
        b"MM\0*": _tiff_size,
        **{f"P{kind}".encode(): _pnm_size for kind in range(1, 7)},
    }
    for signature, read_size in readers.items():
        if data.startswith(signature):
            try:
                return read_size(data)
            except struct.error:  # the header is cut short
                return None
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The size in the first frame header, walking the segments (EXIF thumbnails sit inside them)."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in JPEG_STANDALONE_MARKERS:
            position += 2
        elif marker in JPEG_FRAME_MARKERS:
            height, width = struct.unpack_from(">HH", data, position + 5)
            return width, height
        elif marker == JPEG_START_OF_SCAN:
            return None
        else:
            position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    return None


def _bmp_size(data: bytes) -> tuple[int, int]:
    if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)  # a negative height stores the rows top-down


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: 14-bit sizes minus one, packed after the signature byte
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the 24-bit canvas size minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """The size of the first image (the one OpenCV decodes), from its directory entries."""
    order = "<" if data[:2] == b"II" else ">"
    (directory,) = struct.unpack_from(order + "I", data, 4)
    (entries,) = struct.unpack_from(order + "H", data, directory)
    size: dict[int, int] = {}
    for start in range(directory + 2, directory + 2 + 12 * entries, 12):  # tag, type, count, value
        tag, kind = struct.unpack_from(order + "HH", data, start)
        if tag in (TIFF_WIDTH, TIFF_HEIGHT) and kind in TIFF_VALUE_FORMATS:
            size[tag] = struct.unpack_from(order + TIFF_VALUE_FORMATS[kind], data, start + 8)[0]
    if len(size) < 2:
        return None
    return size[TIFF_WIDTH], size[TIFF_HEIGHT]


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    width = PNM_NUMBER.match(data, 2)
    height = width and PNM_NUMBER.match(data, width.end())
    return (int(width.group(1)), int(height.group(1))) if height else None
