"""Preparing images in processes of their own, so an image that kills its decoder fails alone.

Used only by an attempt that follows a crash: a segfaulting codec or an out-of-memory kill then
takes down a small helper process instead of the worker, and the image that did it gets a
`crashes-worker` record while every other image of the shard is embedded. Each prepare thread has
its own helper, so one death breaks no other thread's work.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from clip_shared.events import DocumentError, ErrorCode
from clip_worker import decoder
from clip_worker.transform import Preprocess

_setup: tuple[Preprocess, int, int] | None = None


def _start(preprocess: Preprocess, image_size: int, max_pixels: int) -> None:
    global _setup
    _setup = (preprocess, image_size, max_pixels)
    try:
        # Under memory pressure the kernel should kill this helper, never the worker beside it.
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def _prepare(data: bytes, url: str) -> torch.Tensor:
    assert _setup is not None
    preprocess, image_size, max_pixels = _setup
    with decoder.decoding(data, url, image_size, max_pixels) as image:
        return preprocess(image)


class Isolated:
    def __init__(self, preprocess: Preprocess, image_size: int, max_pixels: int) -> None:
        self._setup = (preprocess, image_size, max_pixels)
        self._local = threading.local()
        self._pools: list[ProcessPoolExecutor] = []
        self._lock = threading.Lock()

    def prepare(self, data: bytes, url: str) -> torch.Tensor:
        """Like ClipModel.prepare, in this thread's helper process; DocumentError(crashes-worker) if it dies."""
        pool = getattr(self._local, "pool", None)
        if pool is None:
            # spawn: a fork of a process holding CUDA and threads is not safe.
            pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=_start, initargs=self._setup)
            with self._lock:
                self._pools.append(pool)
            self._local.pool = pool
        try:
            return pool.submit(_prepare, data, url).result()
        except BrokenProcessPool:
            self._local.pool = None
            pool.shutdown(wait=False)
            raise DocumentError(
                ErrorCode.CRASHES_WORKER,
                f"{url}: preparing it killed the process that did it (a decoder crash or running out of memory), "
                "after an attempt of this job died while it was in flight",
            ) from None

    def close(self) -> None:
        with self._lock:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=True)
            self._pools.clear()
