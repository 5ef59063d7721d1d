"""No process the project starts can import a repository folder under its bare name.

``kernels`` is also a Hugging Face package that transformers probes for; our top-level ``kernels/``
folder must never answer that probe (it imports Triton, which the default install lacks).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from radixlm.runtime.child_process import child_env, python_command
from tests import REPO_ROOT

pytestmark = pytest.mark.slow  # starts servers or subprocesses: not in the fast tier

PROBE = "import importlib.util as u; print([n for n in ('kernels', 'runtime', 'lang') if u.find_spec(n)])"


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
