"""Grammar compilation in a separate, bounded process.

Building an outlines-core ``Index`` is the one step of constrained decoding whose cost the client
controls: ``a{300}{100}`` takes ~20 s, ``(a|b)*a(a|b){18}`` (2^18 DFA states) as long, ``a{100000}{100000}``
asks for tens of GB and ``a{1000}{100}`` aborts the process from inside the Rust library. So the build
never runs in a server process: ``CompileWorker`` owns one child process (``python -m`` this module)
that sets ``RLIMIT_AS`` on itself and builds one Index at a time; the parent waits at most
``timeout_s`` for the answer. A build over the time limit gets the child killed (and a fresh one is
started for the next job); a child that dies (memory limit, a Rust abort) is reported the same way.
Either is ``GrammarLimitError`` (a ValueError naming the field), which the scheduler turns into that
request's error (HTTP 400); nothing else is affected.

The wire is the project's: length-prefixed msgpack frames over the child's stdin/stdout, never pickle.
The vocabulary goes over once at start, the Index comes back as outlines-core's own binary form
(``Index.from_binary``), so the parent never builds anything itself.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import msgspec

_LEN = struct.Struct(">I")
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CompileLimits:
    """Bounds on one grammar build (server flags --grammar-compile-timeout, --grammar-max-memory-mb)."""

    timeout_s: float = 10.0
    max_memory_mb: int = 2048


class GrammarLimitError(ValueError):
    """A build hit the time or memory limit (or crashed the worker): the grammar is refused."""


class _Job(msgspec.Struct, array_like=True):
    regex: str


class _Result(msgspec.Struct, array_like=True, omit_defaults=True):
    ok: bool
    index: bytes = b""
    error: str = ""


def _write_frame(f, payload: bytes) -> None:
    f.write(_LEN.pack(len(payload)) + payload)
    f.flush()


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """n bytes from fd, None at EOF; TimeoutError past ``deadline`` (monotonic)."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int, deadline: float | None) -> bytes | None:
    head = _read_exact(fd, _LEN.size, deadline)
    if head is None:
        return None
    return _read_exact(fd, _LEN.unpack(head)[0], deadline)


def to_binary(obj) -> bytes:
    """outlines-core's serialized form of a Vocabulary or Index (what ``from_binary`` reads)."""
    _, (data,) = obj.__reduce__()
    return data


class CompileWorker:
    """One bounded compile process, used by one thread at a time (a compile thread, never an event loop)."""

    def __init__(self, vocab_binary: bytes, limits: CompileLimits | None = None) -> None:
        self.vocab_binary = vocab_binary
        self.limits = limits or CompileLimits()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.num_started = 0

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, PYTHONSAFEPATH="1")
        # Run as a script, not ``-m``: the child imports only the standard library, msgspec and
        # outlines-core (no package __init__, no torch), so it starts in a fraction of a second.
        proc = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__), str(self.limits.max_memory_mb), str(self.limits.timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True,  # a signal to the server's process group is the server's business
        )
        _write_frame(proc.stdin, self.vocab_binary)
        try:  # the time limit covers the build, not the interpreter's start and the vocabulary's load
            ready = _read_frame(proc.stdout.fileno(), time.monotonic() + _START_TIMEOUT_S)
        except TimeoutError:
            ready = None
        if ready != b"ready":
            self._proc = proc
            raise GrammarLimitError(f"the grammar compile worker did not start ({self._death_detail()})")
        self.num_started += 1
        return proc

    def build(self, regex: str, field: str):
        """The Index of ``regex`` over the vocabulary. ValueError: the library rejects the pattern;
        GrammarLimitError: the build hit a limit or killed the worker."""
        from outlines_core import Index

        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                _write_frame(proc.stdin, msgspec.msgpack.encode(_Job(regex)))
                frame = _read_frame(proc.stdout.fileno(), time.monotonic() + self.limits.timeout_s)
            except TimeoutError:
                self._kill()
                raise GrammarLimitError(
                    f"{field}: compiling the grammar took longer than the limit of {self.limits.timeout_s:g} s "
                    "(--grammar-compile-timeout); simplify the pattern (nested or large repetition counts)"
                ) from None
            except (BrokenPipeError, OSError):
                frame = None
            if frame is None:
                detail = self._death_detail()
                raise GrammarLimitError(
                    f"{field}: compiling the grammar exceeded the memory limit of {self.limits.max_memory_mb} MB "
                    f"or crashed the compiler ({detail}); simplify the pattern (--grammar-max-memory-mb)"
                )
        res = msgspec.msgpack.decode(frame, type=_Result)
        if not res.ok:
            raise ValueError(res.error)
        return Index.from_binary(res.index)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()

    def _death_detail(self) -> str:
        proc, self._proc = self._proc, None
        if proc is None:
            return "no worker"
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
        code = proc.returncode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"{why}: {err[-1][:200]}" if err else why

    def close(self) -> None:
        with self._lock:
            self._kill()


# --------------------------------------------------------------------------- the child
def _child(max_memory_mb: int, timeout_s: float) -> None:
    import resource

    limit = max_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    from outlines_core import Index, Vocabulary

    fin, fout = sys.stdin.buffer, sys.stdout.buffer
    vocab_bytes = _read_frame(fin.fileno(), None)
    if vocab_bytes is None:
        return
    vocab = Vocabulary.from_binary(vocab_bytes)
    _write_frame(fout, b"ready")
    while True:
        frame = _read_frame(fin.fileno(), None)
        if frame is None:
            return  # the parent is gone or closed us
        job = msgspec.msgpack.decode(frame, type=_Job)
        # A CPU-time backstop per job, for a build that outlives its parent (which would kill it at the
        # timeout): SIGXCPU ends the process.
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + 2 * timeout_s + 5)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard if cpu_hard == resource.RLIM_INFINITY else max(soft, cpu_hard)))
        try:
            res = _Result(ok=True, index=to_binary(Index(job.regex, vocab)))
        except MemoryError:
            os._exit(3)  # reported by the parent as the memory limit
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a ValueError or a Rust panic (BaseException) goes back as text
            res = _Result(ok=False, error=str(e)[:2000] or type(e).__name__)
        _write_frame(fout, msgspec.msgpack.encode(res))


if __name__ == "__main__":
    _child(int(sys.argv[1]), float(sys.argv[2]))
