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
        """A fresh private directory, after removing the ones servers killed without notice left behind."""
        clean_stale_dirs()
        d = tempfile.mkdtemp(prefix=_PREFIX)  # mode 0700 by construction
        os.chmod(d, 0o700)
        with open(os.path.join(d, _OWNER), "w") as f:
            f.write(_process_identity(os.getpid()) or "")
        return cls(
            dir=d,
            scheduler=f"ipc://{d}/scheduler.sock",
            detokenizer=f"ipc://{d}/detokenizer.sock",
            tokenizer=f"ipc://{d}/tokenizer.sock",
        )

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


_PREFIX = "radixlm-ipc-"
_OWNER = "owner"  # "pid starttime" of the server process that created the directory


def _process_identity(pid: int) -> str | None:
    """"pid starttime" (starttime from /proc, so a recycled pid is not mistaken for the owner)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return f"{pid} {fields[19]}"
    except (OSError, IndexError):
        return None


def clean_stale_dirs(root: str | None = None) -> list[str]:
    """Remove ``radixlm-ipc-*`` directories of this user whose owner process is gone (a server killed
    with SIGKILL cannot remove its own). Returns the removed paths."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(root) if n.startswith(_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, _OWNER)) as f:
                owner = f.read().strip()
        except OSError:
            continue  # no owner file (an older version's, or still being made): never guess
        parts = owner.split()
        if len(parts) != 2 or not parts[0].isdigit():
            continue  # no identity recorded (no /proc here): never guess
        if _process_identity(int(parts[0])) == owner:
            continue  # a live server's
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


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


class ParentGone(Exception):
    """Raised by ``send_while_parent_alive`` when the parent died while a send was blocked."""


def send_while_parent_alive(sock, data: bytes, parent_pid: int, wait_s: float = 1.0) -> None:
    """``sock.send(data)`` that cannot block forever: a PUSH socket blocks when its peer stops reading
    (a stopped or killed front process); every ``wait_s`` the parent is checked, and if it is gone the
    child gives up (ParentGone) instead of lingering as an orphan stuck in a send."""
    import zmq

    while True:
        if sock.poll(int(wait_s * 1000), zmq.POLLOUT):
            try:
                sock.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
        if not parent_alive(parent_pid):
            raise ParentGone
