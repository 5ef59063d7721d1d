"""radixlm's tests, laid out like the source. A package, so helpers import as ``from tests.x import``
from tests, benchmarks and a plain ``pytest`` run alike."""
