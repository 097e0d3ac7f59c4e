"""The exception tree; each job-level error has a stable ``code`` used in results and metrics.

WorkerError
├── ConfigError              bad settings or model spec; the process exits with status 2
├── JobError                 final for one job: an error result is written and the job is acked
│   ├── InvalidJobError      invalid_job      malformed stream entry or fields
│   ├── DecodeError          decode_error     bytes are not a decodable image
│   ├── ImageTooLargeError   image_too_large  pixel count above the decompression-bomb limit
│   ├── NoBucketError        no_bucket        the preprocessed shape fits no bucket
│   └── JobExpiredError      expired          the job's deadline passed before inference
├── TransientError           the job stays pending and is redelivered, then dead-lettered
│   ├── BrokerError          Redis is unreachable or answered with an error
│   └── BackendError         backend_error    a batch failed in the backend
│       ├── EngineLoadError  the engine cannot be built, loaded or is not usable
│       └── ShapeOutOfProfileError  a batch shape lies outside its bucket's profile
└── UnsupportedFeatureError  the installed TensorRT cannot do what was asked
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "internal_error"


class ConfigError(WorkerError):
    code = "config_error"


class JobError(WorkerError):
    """A failure that belongs to one job and will not go away on retry."""


class InvalidJobError(JobError):
    code = "invalid_job"


class DecodeError(JobError):
    code = "decode_error"


class ImageTooLargeError(JobError):
    code = "image_too_large"


class NoBucketError(JobError):
    code = "no_bucket"


class JobExpiredError(JobError):
    code = "expired"


class TransientError(WorkerError):
    """A failure that may pass: the job is left pending and delivered again."""


class BrokerError(TransientError):
    code = "broker_error"


class BackendError(TransientError):
    code = "backend_error"


class EngineLoadError(BackendError):
    code = "engine_load_error"


class ShapeOutOfProfileError(BackendError):
    code = "shape_out_of_profile"


class UnsupportedFeatureError(WorkerError):
    code = "unsupported_feature"
