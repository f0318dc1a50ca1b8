"""The worker's configuration: every environment variable it reads, parsed once, here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from clip_shared import defaults
from clip_worker.sandbox import Limits


class ConfigError(ValueError):
    """A setting that is missing or malformed; the message names the variable and the fix."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    value = _optional_int(env, name, minimum)
    return default if value is None else value


def _optional_int(env: Mapping[str, str], name: str, minimum: int = 1) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw not in ("", "true", "false"):
        raise ConfigError(f"{name}={raw!r} must be true or false")
    return raw == "true"


@dataclass(frozen=True)
class WorkerConfig:
    manifest_uri: str
    output_bucket: str
    output_prefix: str = ""
    model: str = defaults.MODEL
    #: An open_clip tag (`openai`, `laion2b_s34b_b79k`...), a checkpoint file, or `none` (random weights).
    pretrained: str = defaults.PRETRAINED
    #: Extra open_clip model configs (a JSON file or a folder of them) for architectures open_clip lacks.
    model_config_path: str | None = None
    #: Where open_clip keeps downloaded weights; the image bakes them here so jobs never download.
    cache_dir: str | None = None
    #: `cuda`, `cpu`, or None for CUDA whenever it is available.
    device: str | None = None
    #: Decode JPEGs on the model's device (nvJPEG); None decides: on a CUDA GPU with a hardware JPEG decoder.
    gpu_decode: bool | None = None
    #: None picks a size that suits the device (see model.default_batch_size).
    batch_size: int | None = None
    #: Threads that download ahead of the model, each handing its object to a decoding process.
    io_threads: int = 16
    max_object_bytes: int = defaults.MAX_OBJECT_BYTES
    max_image_pixels: int = 100_000_000
    #: Processes that decode, each one object at a time under the budget below (sandbox.py); None:
    #: one per CPU the worker may use, as many as can decode at once.
    decode_workers: int | None = None
    #: One object's budget (README, "Worker configuration", says why these figures): CPU seconds,
    #: megabytes of memory beyond what the decoding process holds, and seconds of wall time.
    decode_cpu_s: int = 20
    decode_memory_mb: int = 3072
    decode_wall_s: int = 60
    #: Bytes of JPEGs held for the device decoder at once (uploads waiting for their batch); past
    #: it, a JPEG is decoded on the CPU instead of waiting.
    device_jpeg_mb: int = 4096
    #: The job definition's JobTimeoutSeconds: the child stops starting work this long before it
    #: ends, writes its outputs and leaves the rest to the next attempt (or records it as timed-out
    #: on the last). None: no timeout.
    job_timeout_s: int | None = None
    progress_interval_s: int = 15
    #: How often the child's shard and events batch are rewritten while it runs (and at its end):
    #: what a crash can cost is this much work, redone by the next attempt.
    checkpoint_s: int = 120
    #: Also write each image's own vector and CloudEvent (off: one shard and one batch per child).
    per_object_outputs: bool = False
    #: Zero-shot keywords from this label set: `default`, labels separated by commas, or the s3:// URI
    #: of a text file (see labels.read_labels); None: no keywords.
    labels: str | None = None
    #: How many labels each image's event lists, best first.
    keywords_top_k: int = 5
    #: Set by AWS Batch on each child of an array job; None for a plain job.
    array_index: int | None = None
    #: The Batch job id, recorded in each event's data as jobId.
    job_id: str | None = None
    #: This run's attempt (Batch sets AWS_BATCH_JOB_ATTEMPT, from 1) and the job definition's attempts
    #: (JOB_ATTEMPTS): a transient failure is left to the next attempt, and recorded only on the last.
    #: Both count EARLIER_ATTEMPTS too: those the Lambda lane made before handing the manifest to Batch.
    attempt: int = 1
    max_attempts: int = 1
    #: How long to wait before trying the objects that failed transiently once more, in the same run.
    transient_retry_s: int = 20
    #: Leave an object over the decoding budget's memory or wall time (or whose decoding the kernel
    #: killed for memory) to the next attempt instead of failing it: the Lambda lane has less of both
    #: than the Batch job, which takes what the lane could not afford.
    defer_too_costly: bool = False

    @property
    def decode_limits(self) -> Limits:
        return Limits(self.decode_cpu_s, self.decode_memory_mb, self.decode_wall_s)

    @property
    def decode_processes(self) -> int:
        return self.decode_workers or len(os.sched_getaffinity(0))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        env = os.environ if env is None else env
        missing = [name for name in ("MANIFEST_URI", "OUTPUT_BUCKET") if not env.get(name)]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set (see README, 'Worker configuration')")
        device = env.get("DEVICE", "auto").strip().lower()
        if device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"DEVICE={device!r} must be auto, cuda or cpu")
        gpu_decode = env.get("GPU_DECODE", "auto").strip().lower()
        if gpu_decode not in ("auto", "on", "off"):
            raise ConfigError(f"GPU_DECODE={gpu_decode!r} must be auto, on or off")
        # A manifest the Lambda lane could not finish reaches Batch with the lane's attempt counted, so
        # that the job's attempts resume what it finished and suspect what it had in flight.
        earlier = _int(env, "EARLIER_ATTEMPTS", 0, minimum=0)
        return cls(
            manifest_uri=env["MANIFEST_URI"],
            output_bucket=env["OUTPUT_BUCKET"],
            output_prefix=env.get("OUTPUT_PREFIX", ""),
            model=env.get("CLIP_MODEL") or cls.model,
            pretrained=env.get("CLIP_PRETRAINED") or cls.pretrained,
            model_config_path=env.get("CLIP_MODEL_CONFIG") or None,
            cache_dir=env.get("CLIP_CACHE_DIR") or None,
            device=None if device == "auto" else device,
            gpu_decode=None if gpu_decode == "auto" else gpu_decode == "on",
            batch_size=_optional_int(env, "BATCH_SIZE"),
            io_threads=_int(env, "IO_THREADS", cls.io_threads),
            max_object_bytes=_int(env, "MAX_OBJECT_BYTES", cls.max_object_bytes),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", cls.max_image_pixels),
            decode_workers=_optional_int(env, "DECODE_WORKERS"),
            decode_cpu_s=_int(env, "DECODE_CPU_SECONDS", cls.decode_cpu_s),
            decode_memory_mb=_int(env, "DECODE_MEMORY_MB", cls.decode_memory_mb),
            decode_wall_s=_int(env, "DECODE_WALL_SECONDS", cls.decode_wall_s),
            device_jpeg_mb=_int(env, "DEVICE_JPEG_MB", cls.device_jpeg_mb),
            job_timeout_s=_optional_int(env, "JOB_TIMEOUT_SECONDS"),
            progress_interval_s=_int(env, "PROGRESS_INTERVAL_SECONDS", cls.progress_interval_s),
            checkpoint_s=_int(env, "CHECKPOINT_SECONDS", cls.checkpoint_s),
            per_object_outputs=_bool(env, "PER_OBJECT_OUTPUTS"),
            labels=env.get("CLIP_LABELS", "").strip() or None,
            keywords_top_k=_int(env, "KEYWORDS_TOP_K", cls.keywords_top_k),
            array_index=_optional_int(env, "AWS_BATCH_JOB_ARRAY_INDEX", minimum=0),
            job_id=env.get("AWS_BATCH_JOB_ID") or None,
            attempt=earlier + _int(env, "AWS_BATCH_JOB_ATTEMPT", cls.attempt),
            max_attempts=earlier + _int(env, "JOB_ATTEMPTS", cls.max_attempts),
            transient_retry_s=_int(env, "TRANSIENT_RETRY_SECONDS", cls.transient_retry_s, minimum=0),
            defer_too_costly=_bool(env, "DEFER_TOO_COSTLY"),
        )
