"""TensorRT's ILogger bridged onto ``logging``: each warning once, and the callback never raises."""

from __future__ import annotations

import logging
import threading

import tensorrt as trt

logger = logging.getLogger(__name__)

_LEVELS = {
    trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
    trt.ILogger.Severity.ERROR: logging.ERROR,
    trt.ILogger.Severity.WARNING: logging.WARNING,
    trt.ILogger.Severity.INFO: logging.DEBUG,
    trt.ILogger.Severity.VERBOSE: logging.DEBUG,
}


class LoggingBridge(trt.ILogger):  # type: ignore[misc]
    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.last_error = ""

    def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
        try:
            level = _LEVELS.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.last_error = msg
            elif level == logging.WARNING:
                with self._lock:
                    if msg in self._seen:
                        return
                    self._seen.add(msg)
            logger.log(level, "%s", msg)
        except Exception:  # a logging callback must never raise into TensorRT
            pass


_bridge: LoggingBridge | None = None


def trt_logger() -> LoggingBridge:
    """One logger per process, as TensorRT expects."""
    global _bridge  # noqa: PLW0603 - a process-wide singleton by TensorRT's design
    if _bridge is None:
        _bridge = LoggingBridge()
    return _bridge
