"""Every example script runs to completion (exit status 0) on the tiny model.

The examples connect to the session's shared server through ``RADIXLM_URL``; the quick start runs
exactly as the README says (no environment, in an empty folder: it builds the tiny model itself and
starts its own runtime).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_lang_support import shared_runtime

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
EXAMPLES = ["few_shot.py", "parallel_branches.py", "react_agent.py", "multi_turn_chat.py",
            "json_extraction.py", "openai_backend.py"]


@pytest.fixture(scope="module")
def runtime(tiny_llama):
    return shared_runtime(tiny_llama)


def _run(script: str, cwd, env: dict, timeout: int = 420) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES_DIR, script)], cwd=cwd, env=env,
                          timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script, runtime, tiny_llama, tmp_path):
    env = dict(os.environ, RADIXLM_URL=runtime.url, RADIXLM_MODEL=tiny_llama)
    proc = _run(script, tmp_path, env)
    assert proc.stdout.strip()


def test_quick_start_is_one_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIXLM_")}
    proc = _run("quick_start.py", tmp_path, env)
    assert (tmp_path / "tiny-model" / "config.json").exists()  # it built the model itself
    assert "cache statistics" in proc.stdout and "hit rate" in proc.stdout
