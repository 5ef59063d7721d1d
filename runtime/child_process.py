"""How radixlm starts Python child processes, and what they may import.

The repository keeps the product's folders at its root (``lang/``, ``runtime/``, ``kernels/``), mapped
into the ``radixlm`` namespace by the install. A Python process whose ``sys.path`` holds the repository
root (``python -m ...`` or ``python -c`` started there puts the working directory first) could import
those folders under their bare names; ``kernels`` is also the name of a Hugging Face package that
transformers probes for, so the probe would find our folder. Every child process the project starts
therefore runs with Python's safe-path mode (``-P`` / ``PYTHONSAFEPATH``: the working directory is not
prepended), and every entry point calls :func:`isolate_sys_path`, which removes the repository root from
``sys.path`` of a process the user started by hand in that folder. multiprocessing "spawn" children
copy their parent's ``sys.path``, so they inherit the clean path.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# runtime/ of an editable install sits at <repository>/runtime; in a wheel install the parent is
# site-packages/radixlm, which is never on sys.path, so the removal below is a no-op there.
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def _is_repository_root(entry: str) -> bool:
    path = Path(entry or os.getcwd())
    try:
        return path.resolve() == _PACKAGE_PARENT
    except OSError:
        return False


def isolate_sys_path() -> None:
    """Drop the repository root (and ``''`` when the working directory is the root) from ``sys.path``."""
    sys.path[:] = [p for p in sys.path if not _is_repository_root(p)]


def bind_hub_kernels() -> None:
    """Bind the bare name ``kernels`` to Hugging Face's package (when it is installed) before anything asks.

    For processes that keep the repository root on ``sys.path`` by design: pytest puts it back for every
    test module it imports, and a notebook started in the root has it. transformers (5.25 and later
    depend on ``kernels``) does ``from kernels import ...`` while loading a model; once the real package
    sits in ``sys.modules`` under that name, our folder can no longer answer.
    """
    current = sys.modules.get("kernels")
    origin = getattr(current, "__file__", None)
    if origin is not None and not _is_repository_root(str(Path(origin).parent.parent)):
        return  # already the real package
    sys.modules.pop("kernels", None)
    saved = sys.path[:]
    isolate_sys_path()
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers does not probe for it either
        pass
    finally:
        sys.path[:] = saved


def python_command(module: str, *args: str) -> list[str]:
    """``[python, -P, -m, module, *args]``: run a module without the working directory on its path."""
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe, "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: safe-path mode for it and for anything it starts."""
    return dict(os.environ, PYTHONSAFEPATH="1", **extra)
