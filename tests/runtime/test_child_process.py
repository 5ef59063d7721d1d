"""No process the project starts can import a repository folder under its bare name.

``kernels`` is also a Hugging Face package that transformers probes for; our top-level ``kernels/``
folder must never answer that probe (it imports Triton, which the default install lacks).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from radixlm.runtime.child_process import child_env, python_command
from tests import REPO_ROOT

pytestmark = pytest.mark.slow  # starts servers or subprocesses: not in the fast tier

# Which of the folders' bare names resolve to the folders themselves (Hugging Face's kernels may be installed).
PROBE = (
    "import importlib.util as u; "
    f"print([n for n in ('kernels', 'runtime', 'lang') if (s := u.find_spec(n)) and (s.origin or '').startswith({str(REPO_ROOT)!r})])"
)


def _run(cmd: list[str], env: dict) -> str:
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_plain_python_in_the_root_would_see_the_folders():
    # The control: without the mechanism, a `python -c` started in the root finds them.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    assert _run([sys.executable, "-c", PROBE], env) == "['kernels', 'runtime', 'lang']"


def test_children_start_without_the_working_directory_on_their_path():
    cmd = python_command("radixlm.runtime.child_process")[:-2] + ["-c", PROBE]  # same flags, a probe
    assert _run(cmd, child_env()) == "[]"


def test_entry_points_drop_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = "from radixlm.runtime.child_process import isolate_sys_path; isolate_sys_path(); " + PROBE
    assert _run([sys.executable, "-c", code], env) == "[]"


def test_bind_hub_kernels_wins_over_the_folder_on_the_path():
    # pytest and notebooks keep the root on sys.path; once bound, `kernels` is Hugging Face's package.
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = (
        "import sys; from radixlm.runtime.child_process import bind_hub_kernels; bind_hub_kernels(); "
        "import kernels; print(repr(sys.path[0]), kernels.__file__)"
    )
    first_path_entry, origin = _run([sys.executable, "-c", code], env).split()
    assert first_path_entry == "''"  # the root is still on the path ...
    assert not origin.startswith(str(REPO_ROOT))  # ... yet the real package answered
