"""Decoding under a budget the operating system enforces, one object at a time, in processes of its own.

No check of a file's header bounds what decoding it costs: a stray byte hides a JPEG's scans from a
scan counter, a 146-byte TIFF declares tiles of 2 GB, a BMP's run-length codes or a JPEG's metadata
segments keep Pillow's Python loops busy for minutes. So every decode (and every look at an upload's
header) runs in a long-lived helper process, under limits that apply to the one object it holds:

- CPU time: a profiling timer (ITIMER_PROF) of the budget, started before each object, and
  RLIMIT_CPU a second past it; the kernel kills the helper (SIGPROF, SIGXCPU) when the object takes more.
- Memory: RLIMIT_AS, set before each object to the helper's address space plus the budget; an
  allocation past it fails (MemoryError, or the codec's "out of memory"), and the helper is replaced.
- Wall time: a deadline the caller waits, after which it kills the helper (SIGKILL).

An object over budget fails alone, as DocumentError(too-costly) naming the limit; one whose decoder
crashes its helper, as crashes-worker. The helper is replaced and the other objects go on. Helpers
talk to the caller over plain pipes (AWS Lambda has no /dev/shm, which multiprocessing's pools and
queues need); each request is a module-level function and its arguments, pickled (their bytes out of
band, written from where they lie), and each answer its result or exception, pickled. Helpers are spawned, never forked: the caller holds threads and,
on a GPU, CUDA. They start when the sandbox is made, while the caller loads its model, and import
no torch (clip_worker.pixels): they send back the model's input as 8-bit pixels, which the caller
normalises.

Run as `python -m clip_worker.sandbox REQUEST_FD ANSWER_FD MODULE...` by Sandbox only.
"""

from __future__ import annotations

import fcntl
import math
import os
import pickle
import queue
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from clip_shared.events import DocumentError, ErrorCode

T = TypeVar("T")

_HEADER = struct.Struct("<Q")
#: Linux's default ceiling for an unprivileged pipe (/proc/sys/fs/pipe-max-size).
PIPE_BYTES = 1024 * 1024
#: What a helper's heap may keep of earlier objects before a fresh helper replaces it.
RETAINED_BYTES = 64 * 1024 * 1024
#: How long a helper may take to import its modules and say it is ready: not the object's time.
START_TIMEOUT_S = 300
#: An error message that says a codec could not allocate (Pillow's codec status, libtiff's, zlib's).
_OUT_OF_MEMORY = ("out of memory", "cannot allocate", "memoryerror", "not enough memory", "insufficient memory")


@dataclass(frozen=True)
class Limits:
    """What one object (one call) may cost; the settings that set each are named in every refusal."""

    cpu_s: int
    memory_mb: int
    wall_s: int
    #: The settings' names as the deployment spells them, for the messages.
    cpu_setting: str = "DECODE_CPU_SECONDS"
    memory_setting: str = "DECODE_MEMORY_MB"
    wall_setting: str = "DECODE_WALL_SECONDS"
    #: What the budget is for, in the messages: one `object` of a job, one `request` of the query API.
    unit: str = "object"


def too_costly(what: str, limits: Limits, limit: str) -> DocumentError:
    """The refusal of `what` (an object's url) that went over `limit` (`cpu`, `memory` or `wall`)."""
    if limit == "cpu":
        hit = f"over {limits.cpu_s} s of CPU time ({limits.cpu_setting})"
    elif limit == "memory":
        hit = f"over {limits.memory_mb} MB of memory ({limits.memory_setting})"
    else:
        hit = f"over {limits.wall_s} s ({limits.wall_setting})"
    return DocumentError(ErrorCode.TOO_COSTLY, f"{what}: decoding went past the budget of one {limits.unit}: {hit}", limit)


class SandboxError(RuntimeError):
    """A helper could not be started: the same for every object, so not reported as any one's fault."""


class _Died(Exception):
    """A helper that is gone: `returncode` as subprocess gives it, None when it was killed for `limit`."""

    def __init__(self, returncode: int | None, limit: str = "wall") -> None:
        super().__init__(returncode)
        self.returncode = returncode
        self.limit = limit


def _pack(message: Any) -> list[memoryview]:
    """`message` pickled, and the buffers its pickle refers to out of band (protocol 5's PickleBuffer):
    an object's bytes go onto the pipe from where they lie instead of being copied into the pickle
    first, which takes half a millisecond a megabyte."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffers.append)
    return [memoryview(payload), *(buffer.raw() for buffer in buffers)]


def _write(fd: int, parts: Sequence[memoryview]) -> None:
    """One message: how many parts, the size of each, then the parts, in as few writes as the pipe takes."""
    sizes = struct.pack(f"<{len(parts) + 1}Q", len(parts), *(part.nbytes for part in parts))
    views = [view for view in (memoryview(sizes), *parts) if view.nbytes]
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if written:
            views[0] = views[0][written:]


def _read(fd: int, size: int, deadline: float | None) -> bytearray:
    """`size` bytes from `fd`, read straight into one buffer; TimeoutError past `deadline`."""
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        got = os.readv(fd, [view[done:]])
        if not got:
            raise EOFError
        done += got
    return buffer


def _receive(fd: int, deadline: float | None = None) -> Any:
    """The message `_write` wrote, unpickled."""
    (count,) = _HEADER.unpack(_read(fd, _HEADER.size, deadline))
    sizes = struct.unpack(f"<{count}Q", _read(fd, count * _HEADER.size, deadline))
    payload, *buffers = (_read(fd, size, deadline) for size in sizes)
    # Given as bytes, an out-of-band buffer unpickles as bytes; as a bytearray, it would reach the
    # function as a read-only memoryview.
    return pickle.loads(payload, buffers=[bytes(buffer) for buffer in buffers])


class _Helper:
    """One helper process and its two pipes."""

    def __init__(self, modules: Sequence[str]) -> None:
        request_read, self.request = os.pipe()
        self.answer, answer_write = os.pipe()
        for fd in (self.request, self.answer):
            try:
                # A model's input (600 KB) in one or two reads instead of ten of the default 64 KB.
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass
        environment = {
            **os.environ,
            # One object per helper at a time: more threads would only contend with the other helpers.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            # A decode's buffers (a few MB for a photo) from a heap kept between objects: with glibc's
            # defaults a process this small gives them back to the kernel after each object and
            # faults them in again on the next (3 ms of a 12 MP JPEG's 20). A larger block (32 MB
            # and over) is still its own mapping; a helper whose heap kept more than RETAINED_BYTES
            # is replaced (_serve), so that no object's budget depends on the objects before it.
            "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
            "MALLOC_TRIM_THRESHOLD_": str(RETAINED_BYTES),
        }
        self.process = subprocess.Popen(  # noqa: S603 - our own module, with this interpreter
            [sys.executable, "-m", "clip_worker.sandbox", str(request_read), str(answer_write), *modules],
            pass_fds=(request_read, answer_write),
            env=environment,
            stdin=subprocess.DEVNULL,
        )
        os.close(request_read)
        os.close(answer_write)
        self.ready = False
        self.closed = False

    def call(self, request: Sequence[memoryview], wall_s: int) -> tuple[bool, Any, bool]:
        if not self.ready:
            try:
                _receive(self.answer, time.monotonic() + START_TIMEOUT_S)
            except (TimeoutError, EOFError):
                # No object's fault: the environment is broken (an import fails), or the machine stalls.
                self.close()
                raise SandboxError(f"a decoding process did not start (exit code {self.process.returncode})") from None
            self.ready = True
        try:
            _write(self.request, request)
            answer: tuple[bool, Any, bool] = _receive(self.answer, time.monotonic() + wall_s)
            return answer
        except TimeoutError:
            self.close()
            raise _Died(None) from None
        except (EOFError, BrokenPipeError):
            self.close()
            raise _Died(self.process.returncode) from None

    def close(self) -> None:
        # Once only: another thread's new pipe may reuse these descriptor numbers after the first close.
        if self.closed:
            return
        self.closed = True
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.request)
        os.close(self.answer)


#: What every helper imports before it says it is ready: the decoding (clip_worker.pixels), without
#: torch, so a helper starts in a fraction of a second and holds tens of MB.
HELPER_MODULES = ("clip_worker.pixels",)


class Sandbox:
    """`workers` helper processes; `run` hands one call to a free one and waits for its answer.

    Thread-safe: up to `workers` calls run at once, others wait for a helper.
    """

    def __init__(self, limits: Limits, workers: int, modules: Sequence[str] = HELPER_MODULES) -> None:
        self.limits = limits
        self.workers = workers
        self._modules = tuple(modules)
        self._free: queue.SimpleQueue[_Helper] = queue.SimpleQueue()
        self._all: list[_Helper] = []
        self._lock = threading.Lock()
        for _ in range(workers):
            self._free.put(self._start())

    def _start(self) -> _Helper:
        helper = _Helper(self._modules)
        with self._lock:
            self._all.append(helper)
        return helper

    def run(self, what: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a helper, under the limits. `what` (the object's url) names the object
        in a refusal: DocumentError(too-costly) over a limit, DocumentError(crashes-worker) when the
        helper dies of something else. Whatever `function` raises is raised here."""
        # Its bytes arguments (an object's contents) out of band: see _pack.
        out_of_band = tuple(pickle.PickleBuffer(arg) if isinstance(arg, bytes) else arg for arg in args)
        request = _pack((function, out_of_band, self.limits))
        helper = self._free.get()
        try:
            ok, result, retiring = helper.call(request, self.limits.wall_s)
            if isinstance(result, _OutOfMemory):
                # Its heap may be left fragmented or half-freed: a fresh helper takes the next object.
                raise _Died(None, "memory")
            if retiring:
                helper = self._replace(helper)
        except _Died as death:
            helper = self._replace(helper)
            raise self._refusal(what, death) from None
        except SandboxError:
            helper = self._replace(helper)
            raise
        finally:
            self._free.put(helper)
        if ok:
            return result
        raise result

    @property
    def pids(self) -> list[int]:
        """The helpers' process ids, for measuring them (bench/sandbox_bench.py)."""
        with self._lock:
            return [helper.process.pid for helper in self._all]

    def _replace(self, helper: _Helper) -> _Helper:
        helper.close()
        with self._lock:
            self._all.remove(helper)
        return self._start()

    def _refusal(self, what: str, death: _Died) -> DocumentError:
        if death.returncode is None:
            return too_costly(what, self.limits, death.limit)
        if death.returncode in (-signal.SIGPROF, -signal.SIGXCPU):
            return too_costly(what, self.limits, "cpu")
        cause = f"signal {signal.Signals(-death.returncode).name}" if death.returncode < 0 else f"exit code {death.returncode}"
        return DocumentError(
            ErrorCode.CRASHES_WORKER,
            f"{what}: decoding it killed the process that did it ({cause}: a decoder crash or the machine out of memory)",
            # SIGKILL is the kernel's out-of-memory killer (helpers volunteer first, oom_score_adj), not a codec.
            "memory" if death.returncode == -signal.SIGKILL else None,
        )

    def close(self) -> None:
        with self._lock:
            helpers, self._all = self._all, []
        for helper in helpers:
            helper.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _OutOfMemory:
    """A helper's answer when the object ran out of its memory budget; the helper exits after it."""


def _out_of_memory(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError) or any(text in str(seen).lower() for text in _OUT_OF_MEMORY):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _address_space() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _serve(request_fd: int, answer_fd: int) -> None:
    unlimited = resource.getrlimit(resource.RLIMIT_AS)[1]
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    ready = _address_space()
    _write(answer_fd, _pack("ready"))
    while True:
        try:
            function, args, limits = _receive(request_fd)
        except EOFError:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # The profiling timer counts this process's CPU time to the millisecond and kills it (SIGPROF)
        # when the object has had its budget; RLIMIT_CPU (whole seconds) is there should anything in
        # the process block that signal. Only soft limits move: a process may raise them again, never
        # a hard limit it lowered.
        signal.setitimer(signal.ITIMER_PROF, limits.cpu_s)
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(usage.ru_utime + usage.ru_stime + limits.cpu_s) + 1, cpu_hard))
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + limits.memory_mb * 1024 * 1024, unlimited))
        replace = False
        try:
            answer: tuple[bool, Any] = (True, function(*args))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller, who decides
            if _out_of_memory(exc):
                replace = True
                answer = (False, _OutOfMemory())
            else:
                answer = (False, exc)
        finally:
            del args
        signal.setitimer(signal.ITIMER_PROF, 0)
        resource.setrlimit(resource.RLIMIT_AS, (unlimited, unlimited))
        # An object's budget is counted from this process's address space when it starts, and what the
        # heap keeps of earlier objects is reused without counting: past RETAINED_BYTES of it, a fresh
        # helper takes the next object, so the budget any object gets is its own, give or take that.
        retiring = replace or _address_space() > ready + RETAINED_BYTES
        try:
            reply = _pack((*answer, retiring))
        except Exception as exc:  # noqa: BLE001 - an exception that cannot be pickled still fails its call
            reply = _pack((False, RuntimeError(f"{type(answer[1]).__name__}: {exc}"), retiring))
        _write(answer_fd, reply)
        if retiring:
            return


def main(argv: Sequence[str]) -> None:
    request_fd, answer_fd, *modules = argv
    # The kernel should kill a helper under memory pressure, never the process it serves; and a
    # helper killed for its CPU time (SIGXCPU dumps core by default) leaves no core file behind.
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as adjust:
            adjust.write("1000")
    except OSError:
        pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    # Ctrl-C or SIGTERM to the whole process group is the caller's to handle (it finishes what is in
    # flight): a helper finishes its object, and exits when the caller closes its pipe or dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for module in modules:
        __import__(module)
    _serve(int(request_fd), int(answer_fd))


if __name__ == "__main__":
    # As its module, not as __main__: what it pickles back must unpickle as clip_worker.sandbox's.
    from clip_worker import sandbox

    sandbox.main(sys.argv[1:])
