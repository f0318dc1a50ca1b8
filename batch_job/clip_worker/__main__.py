"""`python -m clip_worker`, the Batch job's command: settings from the environment, SIGTERM handled."""

from __future__ import annotations

import signal
import sys
import threading

from clip_shared.aws import is_transient
from clip_shared.manifest import ManifestError
from clip_worker.config import ConfigError, WorkerConfig
from clip_worker.labels import LabelError
from clip_worker.log import logger
from clip_worker.model import ModelLoadError
from clip_worker.runner import EXIT_FAILED, EXIT_RETRY, run


def main() -> int:
    stop = threading.Event()

    def on_sigterm(signum: int, _frame: object) -> None:
        # Spot reclaim or job termination: finish what is in flight, flush, and let the retry resume.
        logger.warning("SIGTERM received: finishing the batch in flight, then exiting", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        config = WorkerConfig.from_env()
        return run(config, stop).exit_code
    except (ConfigError, ManifestError, LabelError, ModelLoadError) as exc:
        logger.error(str(exc))
        # A manifest or label set S3 would not serve now may be served to the next attempt.
        return EXIT_RETRY if exc.__cause__ is not None and is_transient(exc.__cause__) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
