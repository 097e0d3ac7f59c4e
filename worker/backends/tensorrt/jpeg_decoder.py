"""JPEGs decoded by the GPU that runs the engine, straight into a lane's input tensor.

JPEG decoding was most of a worker's CPU per image; the GPU's hardware JPEG engines decode the same
images for a twentieth of the CPU. One nvImageCodec decoder per device serves every lane (the
hardware backend first, the CUDA one behind it for what the engines refuse), on a stream of its
own; each decoded image is copied into its padded slot of the lane's input, after the slot is
filled with the pad value. A JPEG it cannot decode fails alone: its slot is reported, the others
run. Without nvImageCodec the backend says so once and every JPEG decodes on the CPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from worker.backends.base import Compressed
from worker.backends.tensorrt._cuda import Device, Stream, copy_rows, fill_at

logger = logging.getLogger(__name__)


class DeviceJpegDecoder:
    def __init__(self, nvimgcodec: Any, device: Device, pad_value: int) -> None:
        self._nv = nvimgcodec
        self._device = device
        self._pad_value = pad_value
        device.bind()
        self._stream = Stream()
        kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU)
        self._decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(kind) for kind in kinds])
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.I_BGR,
        )
        self._lock = threading.Lock()  # one decode at a time per device: the decoder is shared by every lane

    @classmethod
    def open(cls, device: Device, pad_value: tuple[int, int, int]) -> DeviceJpegDecoder | None:
        """The device's decoder, or None (logged once, with why) when JPEGs must decode on the CPU."""
        if len(set(pad_value)) != 1:
            logger.info("JPEGs decode on the CPU: the pad value %s differs per channel", pad_value)
            return None
        try:
            from nvidia import nvimgcodec
        except ImportError as exc:
            logger.warning("JPEGs decode on the CPU: nvImageCodec is not installed (%s)", exc)
            return None
        decoder = cls(nvimgcodec, device, pad_value[0])
        logger.info("JPEGs that need no resizing decode on %s (nvImageCodec %s)", device.name, nvimgcodec.__version__)
        return decoder

    def decode_into(self, base: int, height: int, width: int, channels: int, items: Sequence[Compressed]) -> set[int]:
        """Decode each (slot, bytes, h, w) into slot ``slot`` of the NHWC uint8 tensor at device
        address ``base`` (slots of ``height`` x ``width``), padding around it; the slots that failed.
        Returns once the slots are written."""
        slot_bytes = height * width * channels
        pitch = width * channels
        failed: set[int] = set()
        with self._lock:
            self._device.bind()
            # A batched hardware decode may start before earlier work on its stream has ended (a
            # known nvJPEG issue): wait on the host first.
            self._stream.synchronize()
            streams = [self._nv.CodeStream(bytes(data)) for _, data, _, _ in items]
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
            self._stream.synchronize()  # the slots are written before the lane's stream reads them
        return failed

    def close(self) -> None:
        with self._lock:
            self._device.bind()
            self._stream.synchronize()
            self._stream.destroy()
