"""JPEGs decoded by the GPU that runs the engine, straight into the lanes' input tensors.

JPEG decoding was most of a worker's CPU per image; the GPU's hardware JPEG engines decode the same
images for a twentieth of the CPU, and fastest in large batches from one decoder: a decoder per
lane, a dozen decoding 16 images each at once, gave an H200 a third of what one decoder gives in
batches of 64. So a device has one decoder (the hardware backend first, the CUDA one behind it for
what the engines refuse) on a stream of its own, and one thread that decodes every lane's waiting
JPEGs together (``Coalescer``); each lane waits for its own, then borrows an execution context.
Decoded images land in a pool allocated once for a full batch at the largest shape, so device
memory does not move with traffic; each is copied into its slot of its lane's input, padded around
it where it does not fill the slot. A JPEG it cannot decode fails alone: its slot is reported, the
others run. Without nvImageCodec the backend says so once and every JPEG decodes on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np

from worker.backends.base import Compressed
from worker.backends.batching import Coalescer
from worker.backends.tensorrt._cuda import Device, Stream, copy_rows, fill_at

logger = logging.getLogger(__name__)

#: threads of the decoder's own pool (header parsing, the CUDA backend's Huffman decoding): the
#: hardware engines do the rest
DECODER_THREADS = 4
#: images decoded together at most: one decoder gives ~21,000 images/s in batches of 64 (H100)
DECODE_BATCH = 64
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


class _Slot(NamedTuple):
    """One JPEG and where it goes: slot ``slot`` of the NHWC uint8 tensor at device address ``base``."""

    base: int
    height: int
    width: int
    channels: int
    slot: int
    data: bytes | memoryview
    image_height: int
    image_width: int


class DeviceJpegDecoder:
    """A device's decoder, shared by every lane: decodes on its own stream into the lanes' inputs."""

    def __init__(
        self, nvimgcodec: Any, device: Device, pad_value: int, largest: tuple[int, int], capacity: int = DECODE_BATCH
    ) -> None:
        """``largest``: the largest height and width of any bucket; ``capacity``: images per batch at
        most (at least a bucket's max batch), what the image pool is sized for."""
        self._nv = nvimgcodec
        self._device = device
        self._pad_value = pad_value
        device.bind()
        self._stream = Stream()
        kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU)
        self._decoder = nvimgcodec.Decoder(
            device_id=device.ordinal,
            max_num_cpu_threads=DECODER_THREADS,
            backends=[nvimgcodec.Backend(kind) for kind in kinds],
            options=DECODER_OPTIONS,
        )
        self._params = _params(nvimgcodec)
        height, width = largest
        streams = [nvimgcodec.CodeStream(data) for data in _sample_jpegs(capacity, height, width)]
        #: decoded images are written here, batch after batch: allocated once, at the largest shape
        self._pool: list[Any] = self._decoder.decode(streams, params=self._params, cuda_stream=self._stream.address)
        self._stream.synchronize()
        if any(image is None for image in self._pool):
            raise RuntimeError(f"nvImageCodec cannot decode a plain {height}x{width} JPEG on {device.name}")
        self._batches: Coalescer[_Slot, bool] = Coalescer(self._decode, capacity, "jpeg-decoder")

    @property
    def largest_batch(self) -> int:
        """The most JPEGs decoded together so far (lanes' requests merged)."""
        return self._batches.largest_batch

    def decode_into(self, base: int, height: int, width: int, channels: int, items: Sequence[Compressed]) -> set[int]:
        """Decode each (slot, bytes, h, w) into slot ``slot`` of the NHWC uint8 tensor at device
        address ``base`` (slots of ``height`` x ``width``), padded around it; returns when they are
        there, with the slots that failed. Work queued on the tensor before must be done."""
        slots = [_Slot(base, height, width, channels, slot, data, h, w) for slot, data, h, w in items]
        decoded = self._batches.submit(slots)
        return {slot.slot for slot, ok in zip(slots, decoded, strict=True) if not ok}

    def _decode(self, slots: list[_Slot]) -> list[bool]:
        """On the decoder's thread: one batch, then each image into its slot; the stream is idle
        before each batch (a batched hardware decode may start before earlier work on its stream
        has ended: a known nvJPEG issue) and after it."""
        self._device.bind()
        streams = [self._nv.CodeStream(bytes(slot.data)) for slot in slots]
        # None where an image could not be decoded (nvImageCodec >= 0.9)
        images = self._decoder.decode(
            streams, images=self._pool[: len(slots)], params=self._params, cuda_stream=self._stream.address
        )
        decoded = []
        for slot, image in zip(slots, images, strict=True):
            pitch = slot.width * slot.channels
            slot_bytes = slot.height * pitch
            target = slot.base + slot.slot * slot_bytes
            h, w = slot.image_height, slot.image_width
            if (h, w) != (slot.height, slot.width) or image is None:
                fill_at(target, self._pad_value, slot_bytes, self._stream)
            if image is None or tuple(image.shape) != (h, w, slot.channels):
                decoded.append(False)
                continue
            interface = image.__cuda_array_interface__
            source_pitch = interface["strides"][0] if interface.get("strides") else w * slot.channels
            copy_rows((target, pitch), (interface["data"][0], source_pitch), w * slot.channels, h, self._stream)
            decoded.append(True)
        self._stream.synchronize()
        return decoded

    def close(self) -> None:
        """After the last ``decode_into``: the pool's images go before the stream they were decoded on."""
        self._batches.close()
        self._device.bind()
        self._stream.synchronize()
        self._pool = []
        self._decoder = None
        self._stream.destroy()
