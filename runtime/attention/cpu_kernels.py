"""Builds and loads the native CPU kernels: the torch backend's (``cpu_paged_decode.cpp``, ``cpu_paged_extend.cpp``)
and the decoder's elementwise ops (``runtime/models/cpu_decoder_ops.cpp``).

Each is plain C++ with no torch headers, called through ctypes. It is compiled on first use with the
system C++ compiler (``$CXX`` or ``g++``; the same one inductor needs; ``-O3 -march=native -fopenmp``)
into a cache keyed by the source, the shared ``cpu_common.h`` (helpers every kernel includes), the
compiler, the flags and the CPU (``$RADIXLM_KERNEL_CACHE``, default ``~/.cache/radixlm/kernels``):
about a second, once per machine. OpenMP is the runtime torch
already loaded (libgomp.so.1 is matched by soname), so ``torch.set_num_threads`` governs the kernels
too. A library that cannot be built or loaded is None (logged once) and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_loaded: dict[str, ctypes.CDLL | None] = {}


def load_library(name: str, fallback: str, folder: Path = _HERE) -> ctypes.CDLL | None:
    """``<name>.cpp`` in ``folder`` (default: next to this file), built (cached on disk) and loaded once per
    process; None if it cannot be, with a warning that names ``fallback`` (what the caller does instead)."""
    if name not in _loaded:
        try:
            _loaded[name] = build_library(Path(folder) / f"{name}.cpp")
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            logger.warning("CPU kernel %s unavailable (%s): %s", name, e, fallback)
            _loaded[name] = None
    return _loaded[name]


def build_library(source: str | Path) -> ctypes.CDLL:
    """Any kernel source, built like the ones next to this file (cached) and loaded; for benchmarks that
    compare a kernel with an older version of itself. Raises where it cannot be built."""
    return ctypes.CDLL(str(_build(Path(source))))


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set(_cpu_flags_line().split()[2:])


def _cpu_flags_line() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(source: Path) -> Path:
    """Compile ``source`` into the cache (atomically: concurrent builders each rename a finished file)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler ($CXX, g++ or c++) on PATH")
    src = source.read_bytes()
    # The shared header (``cpu_common.h``, included from this folder) is part of every kernel's source.
    headers = b"".join(h.read_bytes() for h in sorted(_HERE.glob("*.h")))
    key = hashlib.sha256(b"\0".join([src, headers, cxx.encode(), " ".join(_FLAGS).encode(),
                                      platform.machine().encode(), _cpu_flags_line().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("RADIXLM_KERNEL_CACHE") or Path.home() / ".cache" / "radixlm" / "kernels")
    target = cache / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *_FLAGS, f"-I{_HERE}", str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built the CPU kernel %s: %s", source.stem, target)
    return target
