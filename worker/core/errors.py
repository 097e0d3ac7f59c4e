"""The exception tree; each job-level error has a stable ``code`` used in results and metrics.

WorkerError
├── ConfigError              bad settings, model spec or credentials; the process exits with status 2
├── EngineLoadError          the engine cannot be built, loaded or is not usable (start-up)
├── UnsupportedFeatureError  the installed TensorRT cannot do what was asked
├── JobError                 final for one job: an error result is written and the job is acked
│   ├── InvalidJobError      invalid_job      malformed stream entry or fields
│   ├── DecodeError          decode_error     bytes are not a decodable image of an accepted format
│   ├── ImageTooLargeError   image_too_large  bytes, pixels or decoded size above the limits
│   ├── NoBucketError        no_bucket        the preprocessed shape fits no bucket
│   └── JobExpiredError      expired          the job's deadline passed before inference
└── TransientError           the job stays pending, is retried, then dead-lettered
    ├── BrokerError          Redis is unreachable or answered with an error
    │   └── RedisRefusedError  Redis answered but refused: out of memory, a key of the wrong type
    ├── BackendError         backend_error    a batch failed in the backend
    │   └── ShapeOutOfProfileError  a batch shape lies outside its bucket's profile
    └── StalledError         stalled          the job was held past stall_s: the pipeline wedged

InternalError is deliberately not a WorkerError: a broken invariant (a bug), never a job's fault.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "internal_error"


class ConfigError(WorkerError):
    code = "config_error"


class EngineLoadError(WorkerError):
    code = "engine_load_error"


class UnsupportedFeatureError(WorkerError):
    code = "unsupported_feature"


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


class RedisRefusedError(BrokerError):
    """Redis answered and said no (out of memory, a key of the wrong type): the same call again
    right away would get the same answer, so producers report it instead of retrying."""

    code = "redis_refused"


class BackendError(TransientError):
    code = "backend_error"


class ShapeOutOfProfileError(BackendError):
    code = "shape_out_of_profile"


class StalledError(TransientError):
    code = "stalled"


class InternalError(Exception):
    """An invariant broke: a bug in this package. The job gets ``internal_error``; never retried."""

    code = "internal_error"
