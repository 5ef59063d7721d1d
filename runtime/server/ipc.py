"""Where the server's processes meet: IPC socket names in a private directory, and process helpers.

Sockets (all ZeroMQ over ``ipc://`` in a fresh ``mkdtemp`` directory, mode 0700, so no other user can
connect; removed at exit)::

    tokenizer manager ──PUSH──▶ scheduler.sock (PULL, bound by the scheduler)
    tokenizer manager ──PUSH──▶ detokenizer.sock (PULL, bound by the detokenizer)   [DetokRegister]
    scheduler         ──PUSH──▶ detokenizer.sock                                    [BatchOut, replies]
    detokenizer       ──PUSH──▶ tokenizer.sock (PULL, bound by the tokenizer manager)

Every process that binds a socket owns it; a ZeroMQ connect may precede the bind, so start order
does not matter.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class IpcNames:
    dir: str
    scheduler: str  # scheduler's input
    detokenizer: str  # detokenizer's input
    tokenizer: str  # tokenizer manager's input

    @classmethod
    def create(cls) -> "IpcNames":
        d = tempfile.mkdtemp(prefix="radixlm-ipc-")  # mode 0700 by construction
        os.chmod(d, 0o700)
        return cls(
            dir=d,
            scheduler=f"ipc://{d}/scheduler.sock",
            detokenizer=f"ipc://{d}/detokenizer.sock",
            tokenizer=f"ipc://{d}/tokenizer.sock",
        )

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual race applies; fine for tests and launchers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def setup_child_process(name: str, log_level: str) -> None:
    """Common start of the scheduler and detokenizer processes.

    Ctrl-C reaches the whole process group; children ignore SIGINT and leave shutdown to the parent,
    which terminates them in order. SIGTERM keeps its default action (exit at once).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_logging(log_level, prefix=name)


def configure_logging(log_level: str, prefix: str = "") -> None:
    fmt = f"[%(asctime)s{' ' + prefix if prefix else ''}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=log_level.upper(), format=fmt, datefmt="%Y-%m-%d %H:%M:%S", force=True)


def parent_alive(parent_pid: int) -> bool:
    """A child whose parent died is re-parented; then it must exit rather than linger as an orphan."""
    return os.getppid() == parent_pid
