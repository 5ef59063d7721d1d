"""The scheduler's torch profiler (SGLang's /start_profile and /stop_profile).

``start`` begins recording every forward pass and sampling step the scheduler runs (CPU activity, and
CUDA kernels on a GPU); ``stop`` writes one Chrome trace (open it in chrome://tracing or Perfetto) to
the output folder: the request's ``output_dir``, else ``$SGLANG_TORCH_PROFILER_DIR``, else
``/tmp/radixlm-profile``. Lives in the scheduler's process and thread, which is where the work runs.
"""

from __future__ import annotations

import os
import time
from typing import Any


class SchedulerProfiler:
    def __init__(self) -> None:
        self._prof: Any = None
        self._dir = ""

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self, output_dir: str = "") -> tuple[bool, str]:
        if self._prof is not None:
            return False, "the profiler is already running; POST /stop_profile first"
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._dir = output_dir or os.environ.get("SGLANG_TORCH_PROFILER_DIR") or "/tmp/radixlm-profile"
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
        self._prof.start()
        return True, f"profiling; /stop_profile writes the trace to {self._dir}"

    def stop(self, output_dir: str = "") -> tuple[bool, str]:
        if self._prof is None:
            return False, "the profiler is not running; POST /start_profile first"
        prof, self._prof = self._prof, None
        prof.stop()
        folder = output_dir or self._dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"radixlm-{int(time.time() * 1000)}-{os.getpid()}.trace.json")
        prof.export_chrome_trace(path)
        return True, path

    def handle(self, action: str, output_dir: str = "") -> tuple[bool, str]:
        if action == "start":
            return self.start(output_dir)
        if action == "stop":
            return self.stop(output_dir)
        return False, f"action must be 'start' or 'stop', got {action!r}"
