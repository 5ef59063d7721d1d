"""Every example script runs to completion (exit status 0) on the tiny model.

The examples connect to the session's shared server through ``RADIXLM_URL``; the quick start runs as
the README says, from the repository root: it builds the tiny model itself and starts its own runtime.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from tests.lang_helpers import shared_runtime
from tests import REPO_ROOT

pytestmark = pytest.mark.slow  # starts servers or subprocesses: not in the fast tier

EXAMPLES_DIR = os.path.join(REPO_ROOT, "examples")
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


def test_quick_start_from_the_repository_root(tmp_path):
    """The README's last step, as written: ``python examples/quick_start.py`` from the repository root
    (CI also runs the whole README command in a fresh environment with only the default dependencies).
    The summary it prints must add up: computed prompt tokens = prompt tokens - cached tokens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIXLM_") and k != "PYTHONPATH"}
    env["RADIXLM_MODEL"] = str(tmp_path / "tiny-model")  # not ./tiny-model: leave the checkout as it was
    proc = _run("quick_start.py", REPO_ROOT, env)
    assert (tmp_path / "tiny-model" / "config.json").exists()  # it built the model itself
    summary = re.search(r"prompt tokens (\d+), served from the radix cache (\d+) \(hit rate (\d+)%\), "
                        r"computed (\d+)", proc.stdout)
    assert summary, proc.stdout
    prompt, cached, rate, computed = map(int, summary.groups())
    assert 0 < cached < prompt and computed == prompt - cached
    assert rate == round(100 * cached / prompt)
    assert "fork branch 2" in proc.stdout and "select: scoring" in proc.stdout
