"""PNG images assembled from bands of rows compressed apart (by different processes, say).

PNG image data is one zlib stream of the rows, each prefixed by its filter type. A band of rows is
compressed on its own (:func:`compress_band`): its rows filtered with PNG's "Up" filter (difference to
the row above; the band's first row unfiltered, so the band needs no other band), deflated and ended by a
full flush (byte-aligned, no reference back into it). The bands' deflate data then simply follow one
another in the stream (:func:`png_from_bands`), with the Adler-32 checksum of the whole combined from the
bands' checksums: assembling a page costs no compression at all.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

ADLER_BASE = 65521
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_NONE, FILTER_UP = 0, 2
EMPTY_FINAL_BLOCK = b"\x03\x00"  # a final fixed-Huffman deflate block holding only its end code


@dataclass
class Band:
    """Rows of an RGB image, compressed: ``data`` (raw deflate, ending in a full flush), the Adler-32
    checksum and byte length of the filtered rows it holds, and its size in pixels."""
    data: bytes
    adler: int
    length: int
    height: int
    width: int


def compress_band(rgb: np.ndarray, level: int = 6) -> Band:
    """An (H, W, 3) uint8 image as a :class:`Band`."""
    height, width, channels = rgb.shape
    if channels != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 rows, got {rgb.shape} {rgb.dtype}")
    rows = np.ascontiguousarray(rgb).reshape(height, width * 3)
    filtered = np.empty((height, 1 + width * 3), np.uint8)
    filtered[:, 0] = FILTER_UP
    filtered[0, 0] = FILTER_NONE
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG's filters are
    raw = filtered.tobytes()
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    return Band(deflate.compress(raw) + deflate.flush(zlib.Z_FULL_FLUSH), zlib.adler32(raw), len(raw),
                height, width)


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """Adler-32 of A + B from adler32(A), adler32(B) and len(B) (as zlib's adler32_combine).

    With A's sums (a1, b1) and B's (a2, b2), n = len(B): a = a1 + a2 − 1, b = b1 + b2 + n·(a1 − 1), mod 65521.
    """
    n = second_length % ADLER_BASE
    a1, b1, a2, b2 = first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % ADLER_BASE
    b = (b1 + b2 + n * (a1 - 1)) % ADLER_BASE
    return (b << 16) | a


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_from_bands(bands: list[Band]) -> bytes:
    """One 8-bit RGB PNG of the bands stacked top to bottom (all of one width)."""
    width = bands[0].width
    if any(band.width != width for band in bands):
        raise ValueError("bands of different widths")
    adler = 1  # Adler-32 of nothing
    for band in bands:
        adler = adler32_combine(adler, band.adler, band.length)
    stream = b"\x78\x9c" + b"".join(band.data for band in bands) + EMPTY_FINAL_BLOCK + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, sum(band.height for band in bands), 8, 2, 0, 0, 0)  # 8-bit RGB
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
