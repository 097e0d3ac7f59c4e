"""JPEGs decoded by the GPU that runs the engine, straight into a lane's input tensor.

JPEG decoding was most of a worker's CPU per image; the GPU's hardware JPEG engines decode the same
images for a twentieth of the CPU. Each lane has a decoder of its own (the hardware backend first,
the CUDA one behind it for what the engines refuse) that works on the lane's stream: lanes decode
at the same time, as they execute at the same time, and the engine waits on the decode in stream
order, not on the host. Chroma is upsampled by interpolation, as libjpeg does, so the pixels (and
the boxes) match the CPU decode's. Each decoded image is copied into its padded slot of the lane's
input after the slot is filled with the pad value. A JPEG it cannot decode fails alone: its slot
is reported, the others run. Without nvImageCodec the backend says so once and every JPEG decodes
on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from worker.backends.base import Compressed
from worker.backends.tensorrt._cuda import Device, Stream, copy_rows, fill_at

logger = logging.getLogger(__name__)

#: threads of each decoder's own pool (header parsing, the CUDA backend's Huffman decoding): the
#: hardware engines do the rest, and a server has a decoder per lane
DECODER_THREADS = 2
#: interpolated chroma upsampling, as libjpeg does: nvImageCodec 0.9's nvJPEG default, named so that
#: a release with another default does not change the pixels
DECODER_OPTIONS = ":fancy_upsampling=1"


def load_nvimgcodec(device: Device, pad_value: tuple[int, int, int]) -> Any:
    """The nvImageCodec module, or None (logged once, with why) when JPEGs must decode on the CPU."""
    if len(set(pad_value)) != 1:
        logger.info("JPEGs decode on the CPU: the pad value %s differs per channel", pad_value)
        return None
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        logger.warning("JPEGs decode on the CPU: nvImageCodec is not installed (%s)", exc)
        return None
    logger.info("JPEGs that need no resizing decode on %s (nvImageCodec %s)", device.name, nvimgcodec.__version__)
    return nvimgcodec


class DeviceJpegDecoder:
    """A lane's decoder: decodes on the lane's stream, into the lane's input."""

    def __init__(self, nvimgcodec: Any, device: Device, stream: Stream, pad_value: int) -> None:
        self._nv = nvimgcodec
        self._stream = stream
        self._pad_value = pad_value
        device.bind()
        kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU)
        self._decoder = nvimgcodec.Decoder(
            device_id=device.ordinal,
            max_num_cpu_threads=DECODER_THREADS,
            backends=[nvimgcodec.Backend(kind) for kind in kinds],
            options=DECODER_OPTIONS,
        )
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.I_BGR,
        )
        #: the last batch's decoded images: their memory must outlive the copies queued from them
        self._in_use: list[Any] = []

    def decode_into(self, base: int, height: int, width: int, channels: int, items: Sequence[Compressed]) -> set[int]:
        """Queue on the lane's stream: decode each (slot, bytes, h, w) into slot ``slot`` of the NHWC
        uint8 tensor at device address ``base`` (slots of ``height`` x ``width``), padded around it.
        The stream must be idle on entry (a batched hardware decode may start before earlier work on
        its stream has ended: a known nvJPEG issue). Returns the slots that failed."""
        slot_bytes = height * width * channels
        pitch = width * channels
        failed: set[int] = set()
        streams = [self._nv.CodeStream(bytes(data)) for _, data, _, _ in items]
        # None where an image could not be decoded (nvImageCodec >= 0.9)
        images = self._decoder.decode(streams, params=self._params, cuda_stream=self._stream.address)
        for (slot, _, h, w), image in zip(items, images, strict=True):
            target = base + slot * slot_bytes
            fill_at(target, self._pad_value, slot_bytes, self._stream)
            if image is None or tuple(image.shape) != (h, w, channels):
                failed.add(slot)
                continue
            interface = image.__cuda_array_interface__
            source_pitch = interface["strides"][0] if interface.get("strides") else w * channels
            copy_rows((target, pitch), (interface["data"][0], source_pitch), w * channels, h, self._stream)
        self._in_use = images
        return failed

    def release(self) -> None:
        """After the lane's stream is synchronized: the decoded images are no longer read."""
        self._in_use = []
