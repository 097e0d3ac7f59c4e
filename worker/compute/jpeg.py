"""What a JPEG's header says about decoding it on the GPU, read without decoding a pixel.

A GPU's JPEG engines (nvImageCodec's hardware backend, with its CUDA backend behind it) take
baseline and extended Huffman-coded 8-bit JPEGs of one or three components in the common chroma
subsamplings. Everything else (progressive, arithmetic-coded, lossless, 12-bit, CMYK, 4:1:1,
an EXIF rotation the decode would have to apply, data past the header that is cut short) is
decoded on the CPU exactly as before. The header is a few hundred bytes at the front of the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from worker.core.errors import DecodeError

#: start-of-frame markers: baseline, extended, progressive, lossless; 0xC9.. arithmetic-coded
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_HUFFMAN_SEQUENTIAL = frozenset({0xC0, 0xC1})  # baseline, extended sequential
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
#: luma (horizontal, vertical) sampling factors the GPU decodes, chroma at (1, 1): 4:4:4, 4:2:2,
#: 4:4:0 and 4:2:0
_GPU_SAMPLING = frozenset({(1, 1), (2, 1), (1, 2), (2, 2)})
_EXIF = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegLayout:
    """The frame header and what the APP segments before it say."""

    sof: int
    bits: int
    height: int
    width: int
    #: per component: (horizontal, vertical) sampling factors
    sampling: tuple[tuple[int, int], ...]
    #: EXIF orientation, 1 (upright) when there is none
    orientation: int = 1
    #: an Adobe APP14 segment's colour transform, None without one
    adobe_transform: int | None = None
    #: whether the first scan's header names only components of the frame, with Huffman tables
    #: defined before it (a decoder refuses the image otherwise; the GPU's may not say so)
    scan_consistent: bool = False

    @property
    def gpu_decodable(self) -> bool:
        """Whether the GPU's decoders take it and give what the CPU decode gives (upright BGR)."""
        if self.sof not in _HUFFMAN_SEQUENTIAL or self.bits != 8 or self.orientation != 1:
            return False
        if not self.scan_consistent:
            return False
        if len(self.sampling) == 1:
            return True
        luma, *chroma = self.sampling
        return (
            len(self.sampling) == 3
            and luma in _GPU_SAMPLING
            and all(c == (1, 1) for c in chroma)
            and self.adobe_transform != 0  # 0: RGB or CMYK stored without the YCbCr transform
        )


def _exif_orientation(segment: bytes) -> int:
    """The orientation tag of an APP1 Exif segment's first IFD, 1 when it has none."""
    tiff = segment[len(_EXIF) :]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for entry in range(min(count, 512)):
        start = ifd + 2 + 12 * entry
        if start + 12 > len(tiff):
            break
        tag, kind, _, value = struct.unpack(order + "HHIH", tiff[start : start + 10])
        if tag == _ORIENTATION_TAG and kind == 3:  # SHORT
            return value if 1 <= value <= 8 else 1
    return 1


def _scan_consistent(scan: bytes, components: set[int], huffman: set[tuple[int, int]]) -> bool:
    """The scan header names components of the frame, each with DC and AC tables defined."""
    if not scan or len(scan) < 1 + 2 * scan[0]:
        return False
    for i in range(scan[0]):
        component, tables = scan[1 + 2 * i], scan[2 + 2 * i]
        if component not in components or (0, tables >> 4) not in huffman or (1, tables & 0x0F) not in huffman:
            return False
    return True


def layout(data: bytes) -> JpegLayout:
    """The JPEG's frame header and orientation; DecodeError when there is no frame header."""
    if not data.startswith(b"\xff\xd8"):
        raise DecodeError("not a JPEG (no start-of-image marker)")
    orientation, adobe = 1, None
    frame: JpegLayout | None = None
    components: set[int] = set()
    huffman: set[tuple[int, int]] = set()  # (class: 0 DC, 1 AC; table id)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # stray bytes between segments: skip to the next marker, as libjpeg does
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(_EXIF):
            orientation = _exif_orientation(segment)
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe = segment[11]
        elif marker == 0xC4:  # DHT: one or more tables, each 17 bytes plus its symbols
            at = 0
            while at + 17 <= len(segment):
                huffman.add((segment[at] >> 4, segment[at] & 0x0F))
                at += 17 + sum(segment[at + 1 : at + 17])
        elif marker in _SOF and frame is None:
            if len(segment) < 6:
                break
            bits, height, width, count = struct.unpack(">BHHB", segment[:6])
            if not (height and width and count in (1, 3, 4)) or len(segment) < 6 + 3 * count:
                raise DecodeError(f"JPEG frame header is invalid ({width}x{height}, {count} components)")
            factors = tuple((segment[7 + 3 * c] >> 4, segment[7 + 3 * c] & 0x0F) for c in range(count))
            components = {segment[6 + 3 * c] for c in range(count)}
            frame = JpegLayout(marker, bits, height, width, factors, orientation, adobe)
        elif marker in (0xDA, 0xD9) or length < 2:  # the first scan, or the end: the header is over
            break
        pos += 2 + length
    if frame is None:
        raise DecodeError("JPEG has no frame header (truncated or corrupt)")
    scan = b""
    if data[pos + 1 : pos + 2] == b"\xda":  # the first scan's header says whether the frame can be decoded
        scan = data[pos + 4 : pos + 2 + int.from_bytes(data[pos + 2 : pos + 4])]
    return replace(frame, scan_consistent=_scan_consistent(scan, components, huffman))
