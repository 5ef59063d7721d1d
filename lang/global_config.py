"""Process-wide settings of the language (SGLang's ``sglang.global_config``).

Only what a user sets on purpose lives here: the default backend (``set_default_backend``) and two
switches. Everything else is passed explicitly (``.run(backend=...)``), so tests never patch this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class GlobalConfig:
    default_backend: Optional[Any] = None
    # run_batch first sends the program's traced constant prefix so every program hits the cache.
    enable_precache_with_tracing: bool = True
    # The prefix must be at least this long (characters) to be worth a separate request.
    precache_min_chars: int = 64
    # 1: log each finished program's text at INFO level.
    verbosity: int = 0


global_config = GlobalConfig()
