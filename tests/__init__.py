"""radixlm's tests, laid out like the source. A package, so helpers import as ``from tests.x import``
from tests, benchmarks and a plain ``pytest`` run alike."""

import os

# The repository root, for tests that run examples/ or start processes there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
