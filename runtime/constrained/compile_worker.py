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

xgrammar grammars (``ebnf``, ``structural_tag``, and regexes / schemas under ``--grammar-backend
xgrammar``) are built in the same child: its first xgrammar job is preceded by the parent's
``TokenizerInfo.serialize_json()`` (the child imports xgrammar only then, so a worker that only ever
builds regexes stays small), and the ``CompiledGrammar`` comes back as ``serialize_json()``, which the
parent loads with ``CompiledGrammar.deserialize_json`` against its own TokenizerInfo.

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


# Job kinds: "index" (an outlines-core Index of ``pattern``), "xgr_init" (``pattern`` is a serialized
# xgrammar TokenizerInfo), and the xgrammar builds: "ebnf", "structural_tag" (xgrammar's format JSON),
# "structural_tag_legacy" (JSON ``{"tags": [[begin, schema, end], ...], "triggers": [...]}``), "regex", "json".
XGRAMMAR_JOBS = ("ebnf", "structural_tag", "structural_tag_legacy", "regex", "json")


class _Job(msgspec.Struct, array_like=True):
    kind: str
    pattern: str


class _Result(msgspec.Struct, array_like=True, omit_defaults=True):
    ok: bool
    data: bytes = b""  # the Index's binary form, or a CompiledGrammar's JSON
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
        self._xgr_ready: subprocess.Popen | None = None  # the child that holds the TokenizerInfo

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
            res = self._run(_Job("index", regex), field)
        if not res.ok:
            raise ValueError(res.error)
        return Index.from_binary(res.data)

    def build_xgrammar(self, kind: str, pattern: str, field: str, tokenizer_info_json: str) -> str:
        """``CompiledGrammar.serialize_json()`` of an xgrammar build (``kind`` in XGRAMMAR_JOBS), made in
        the child from ``tokenizer_info_json``. ValueError: xgrammar rejects the grammar (its message);
        GrammarLimitError: the build hit a limit or killed the worker."""
        if kind not in XGRAMMAR_JOBS:
            raise ValueError(f"grammar kind {kind!r} is not an xgrammar kind")
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            if self._xgr_ready is not self._proc:
                # Importing xgrammar and loading the vocabulary is start-up, not the build: the start
                # timeout covers it, the memory limit applies as for everything in the child.
                res = self._run(_Job("xgr_init", tokenizer_info_json), field, _START_TIMEOUT_S)
                if not res.ok:
                    raise GrammarLimitError(f"{field}: the grammar compile worker could not load xgrammar ({res.error})")
                self._xgr_ready = self._proc
            res = self._run(_Job(kind, pattern), field)
        if not res.ok:
            raise ValueError(res.error)
        return res.data.decode("utf-8")

    def _run(self, job: _Job, field: str, timeout_s: float | None = None) -> "_Result":
        """One job on the child (started if needed), under the lock; the limits turn into GrammarLimitError."""
        timeout_s = self.limits.timeout_s if timeout_s is None else timeout_s
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        try:
            _write_frame(proc.stdin, msgspec.msgpack.encode(job))
            frame = _read_frame(proc.stdout.fileno(), time.monotonic() + timeout_s)
        except TimeoutError:
            self._kill()
            raise GrammarLimitError(
                f"{field}: compiling the grammar took longer than the limit of {timeout_s:g} s "
                "(--grammar-compile-timeout); simplify the grammar (for a regex: nested or large repetition counts)"
            ) from None
        except (BrokenPipeError, OSError):
            frame = None
        if frame is None:
            detail = self._death_detail()
            raise GrammarLimitError(
                f"{field}: compiling the grammar exceeded the memory limit of {self.limits.max_memory_mb} MB "
                f"or crashed the compiler ({detail}); simplify the pattern (--grammar-max-memory-mb)"
            )
        return msgspec.msgpack.decode(frame, type=_Result)

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
class _XGrammarBuilder:
    """The child's xgrammar compiler, made from the parent's serialized TokenizerInfo (job "xgr_init")."""

    def __init__(self, tokenizer_info_json: str) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.deserialize_json(tokenizer_info_json)
        # No cache here: the parent caches by (kind, pattern); a cache would only spend the memory limit.
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def build(self, kind: str, pattern: str) -> bytes:
        c = self.compiler
        if kind == "ebnf":
            compiled = c.compile_grammar(pattern)
        elif kind == "structural_tag":
            compiled = c.compile_structural_tag(pattern)
        elif kind == "structural_tag_legacy":
            spec = msgspec.json.decode(pattern)
            tags = [self.xgr.StructuralTagItem(begin=b, schema=s, end=e) for b, s, e in spec["tags"]]
            compiled = c.compile_structural_tag(tags, spec["triggers"])
        elif kind == "regex":
            compiled = c.compile_regex(pattern)
        elif kind == "json":
            compiled = c.compile_json_schema(pattern)
        else:
            raise ValueError(f"unknown job kind {kind!r}")
        return compiled.serialize_json().encode("utf-8")


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
    xgr: _XGrammarBuilder | None = None
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
            if job.kind == "index":
                res = _Result(ok=True, data=to_binary(Index(job.pattern, vocab)))
            elif job.kind == "xgr_init":
                xgr = _XGrammarBuilder(job.pattern)
                res = _Result(ok=True)
            elif xgr is None:
                res = _Result(ok=False, error="xgrammar job before xgr_init")
            else:
                res = _Result(ok=True, data=xgr.build(job.kind, job.pattern))
        except MemoryError:
            os._exit(3)  # reported by the parent as the memory limit
        except RuntimeError as e:
            if "bad_alloc" in str(e):  # xgrammar's C++ allocation failure under RLIMIT_AS: the memory limit
                os._exit(3)
            res = _Result(ok=False, error=str(e)[:2000] or type(e).__name__)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a ValueError or a Rust panic (BaseException) goes back as text
            res = _Result(ok=False, error=str(e)[:2000] or type(e).__name__)
        _write_frame(fout, msgspec.msgpack.encode(res))


if __name__ == "__main__":
    _child(int(sys.argv[1]), float(sys.argv[2]))
