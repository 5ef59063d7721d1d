"""SGLang launch flags that radixlm accepts although they do not apply to it.

A SGLang user's command line should start a radixlm server unchanged, so ``radixlm serve`` parses
these flags under SGLang's names and logs one note per flag saying why it has no effect here. Flags
radixlm implements are ``ServerArgs`` fields (``--mem-fraction-static``, ``--log-level``,
``--incremental-streaming-output``, ``--grammar-backend``, ...), not listed here. Any other flag is still
an error, so a typo never passes silently.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("radixlm.server")

# flag → (takes a value, why it does not apply)
IGNORED_FLAGS: dict[str, tuple[bool, str]] = {
    "--enable-metrics": (False, "/metrics is always served"),
    "--cuda-graph-max-bs": (True, "radixlm does not capture CUDA graphs"),
    "--cuda-graph-bs": (True, "radixlm does not capture CUDA graphs"),
    "--disable-cuda-graph": (False, "radixlm does not capture CUDA graphs"),
    "--disable-cuda-graph-padding": (False, "radixlm does not capture CUDA graphs"),
    "--trust-remote-code": (False, "only built-in Llama-family architectures are loaded; no remote code runs"),
    "--skip-server-warmup": (False, "radixlm does no warm-up request"),
    "--warmups": (True, "radixlm does no warm-up request"),
    "--log-requests": (False, "request logging is not implemented; use --log-level debug"),
    "--log-requests-level": (True, "request logging is not implemented; use --log-level debug"),
    "--show-time-cost": (False, "timing is reported by /metrics"),
    "--decode-log-interval": (True, "the scheduler logs every --log-interval-s seconds"),
    "--enable-cache-report": (False, "cached_tokens is always in meta_info and OpenAI usage"),
    "--disable-overlap-schedule": (False, "the scheduler does not overlap CPU and GPU work"),
    "--enable-mixed-chunk": (False, "prefill chunks always join the decode batch"),
    "--triton-attention-num-kv-splits": (True, "the Triton decode kernel sizes its KV splits itself"),
    "--sampling-backend": (True, "sampling runs in torch"),
    "--load-format": (True, "weights load from safetensors"),
    "--kv-cache-dtype": (True, "the KV cache takes the model's --dtype"),
    "--watchdog-timeout": (True, "the launcher watches its child processes instead"),
    "--page-size": (True, "the KV pool's page size is 1"),
    "--disable-priority-preemption": (False, "priority orders admission only; running requests are never preempted"),
    "--priority-scheduling-preemption-threshold": (True, "priority orders admission only; no preemption"),
    "--quantization": (True, "quantization is not implemented; a non-empty value is refused below"),
}

# Flags whose only harmless values are the ones that ask for nothing.
_MUST_BE = {"--quantization": {"none", "None", ""}, "--page-size": {"1"}, "--kv-cache-dtype": {"auto"}}


class _NotedFlag(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option_string=None):
        takes_value, why = IGNORED_FLAGS[option_string]
        allowed = _MUST_BE.get(option_string)
        if allowed is not None and str(values) not in allowed:
            parser.error(f"{option_string} {values}: not supported by radixlm ({why})")
        noted = getattr(namespace, "_sglang_noted_flags", None) or []
        noted.append(f"{option_string}{' ' + str(values) if takes_value else ''}: accepted, no effect ({why})")
        setattr(namespace, "_sglang_noted_flags", noted)


def add_ignored_flags(parser: argparse.ArgumentParser) -> None:
    """Register every flag of ``IGNORED_FLAGS`` (values kept only for the log note)."""
    for flag, (takes_value, _) in IGNORED_FLAGS.items():
        parser.add_argument(flag, action=_NotedFlag, nargs=None if takes_value else 0,
                            help=argparse.SUPPRESS, dest="_sglang_ignored")


def log_ignored_flags(args: argparse.Namespace) -> None:
    """One log line per SGLang flag that was accepted without effect."""
    for note in getattr(args, "_sglang_noted_flags", None) or []:
        logger.info("SGLang flag %s", note)
