"""JPEGs decoded by the GPU that runs the engine, straight into a lane's input tensor.

JPEG decoding was most of a worker's CPU per image; the GPU's hardware JPEG engines decode the same
images for a twentieth of the CPU. Each lane has a decoder of its own (the hardware backend first,
the CUDA one behind it for what the engines refuse) that works on the lane's stream: lanes decode
at the same time, as they execute at the same time, and the engine waits on the decode in stream
order, not on the host. Decoded images land in a pool of images the lane owns, allocated once for
its bucket's largest batch and shape, so device memory does not move with traffic; each is copied
into its slot of the lane's input, padded around it where it does not fill the slot. A JPEG it
cannot decode fails alone: its slot is reported, the others run. Without nvImageCodec the backend
says so once and every JPEG decodes on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from worker.backends.base import Compressed
from worker.backends.tensorrt._cuda import Device, Stream, copy_rows, fill_at

logger = logging.getLogger(__name__)

#: threads of each decoder's own pool (header parsing, the CUDA backend's Huffman decoding): the
#: hardware engines do the rest, and a server has a decoder per lane
DECODER_THREADS = 2
#: interpolated chroma upsampling, as libjpeg does: nvImageCodec 0.9's nvJPEG default, named so that
#: a release with another default does not change the pixels
DECODER_OPTIONS = ":fancy_upsampling=1"
#: the decode path label of JPEGs the device decodes: its hardware JPEG engines, or CUDA kernels on
#: a GPU without them (``imgworker_decode_path_total``)
HARDWARE, CUDA = "gpu_hw", "gpu_cuda"


def _params(nvimgcodec: Any) -> Any:
    return nvimgcodec.DecodeParams(
        apply_exif_orientation=False,
        color_spec=nvimgcodec.ColorSpec.SRGB,
        sample_format=nvimgcodec.SampleFormat.I_BGR,
    )


def _sample_jpegs(count: int, height: int, width: int) -> list[bytes]:
    """JPEGs of a real size and subsampling (a gradient, 4:2:0): what a pool is allocated with."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    image = np.dstack([np.tile(ramp, (height, 1))] * 3)
    data: bytes = cv2.imencode(".jpg", image)[1].tobytes()
    return [data] * count


def load_nvimgcodec(device: Device, pad_value: tuple[int, int, int]) -> tuple[Any, str] | None:
    """The nvImageCodec module and the decode path it gives on this device, or None (logged once,
    with why) when JPEGs must decode on the CPU."""
    if len(set(pad_value)) != 1:
        logger.info("JPEGs decode on the CPU: the pad value %s differs per channel", pad_value)
        return None
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        logger.warning("JPEGs decode on the CPU: nvImageCodec is not installed (%s)", exc)
        return None
    path = HARDWARE if _has_jpeg_engines(nvimgcodec, device) else CUDA
    engines = "its hardware JPEG engines" if path == HARDWARE else "CUDA (it has no hardware JPEG engines)"
    logger.info(
        "JPEGs that need no resizing decode on %s with %s (nvImageCodec %s)",
        device.name,
        engines,
        nvimgcodec.__version__,
    )
    return nvimgcodec, path


def _has_jpeg_engines(nvimgcodec: Any, device: Device) -> bool:
    """Whether a hardware-only decoder decodes a plain JPEG here (A100, H100, H200 have engines;
    most other GPUs have none, and the CUDA backend does all the work)."""
    device.bind()
    try:
        decoder = nvimgcodec.Decoder(
            device_id=device.ordinal, backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]
        )
        (data,) = _sample_jpegs(1, 256, 256)
        return decoder.decode(nvimgcodec.CodeStream(data), params=_params(nvimgcodec)) is not None
    except Exception as exc:  # an unsupported platform may refuse the backend outright
        logger.info("no hardware JPEG decoding on %s: %s", device.name, exc)
        return False


class DeviceJpegDecoder:
    """A lane's decoder: decodes on the lane's stream, into the lane's input."""

    def __init__(
        self, nvimgcodec: Any, device: Device, stream: Stream, pad_value: int, largest: tuple[int, int, int]
    ) -> None:
        """``largest``: the bucket's max batch, height and width, what the image pool is sized for."""
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
        self._params = _params(nvimgcodec)
        n, height, width = largest
        streams = [nvimgcodec.CodeStream(data) for data in _sample_jpegs(n, height, width)]
        #: decoded images are written here, batch after batch: allocated once, at the largest shape
        self._pool: list[Any] = self._decoder.decode(streams, params=self._params, cuda_stream=stream.address)
        stream.synchronize()
        if any(image is None for image in self._pool):
            raise RuntimeError(f"nvImageCodec cannot decode a plain {height}x{width} JPEG on {device.name}")

    def decode_into(self, base: int, height: int, width: int, channels: int, items: Sequence[Compressed]) -> set[int]:
        """Queue on the lane's stream: decode each (slot, bytes, h, w) into slot ``slot`` of the NHWC
        uint8 tensor at device address ``base`` (slots of ``height`` x ``width``), padded around it.
        The stream must be idle on entry (a batched hardware decode may start before earlier work on
        its stream has ended: a known nvJPEG issue), and synchronized before the next call (the pool's
        images are read by the copies queued here). Returns the slots that failed."""
        slot_bytes = height * width * channels
        pitch = width * channels
        failed: set[int] = set()
        streams = [self._nv.CodeStream(bytes(data)) for _, data, _, _ in items]
        # None where an image could not be decoded (nvImageCodec >= 0.9)
        images = self._decoder.decode(
            streams, images=self._pool[: len(items)], params=self._params, cuda_stream=self._stream.address
        )
        for (slot, _, h, w), image in zip(items, images, strict=True):
            target = base + slot * slot_bytes
            if (h, w) != (height, width) or image is None:
                fill_at(target, self._pad_value, slot_bytes, self._stream)
            if image is None or tuple(image.shape) != (h, w, channels):
                failed.add(slot)
                continue
            interface = image.__cuda_array_interface__
            source_pitch = interface["strides"][0] if interface.get("strides") else w * channels
            copy_rows((target, pitch), (interface["data"][0], source_pitch), w * channels, h, self._stream)
        return failed
