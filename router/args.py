"""RouterArgs: the router's configuration (frozen), its command line (``radixlm router``) and checks."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from radixlm.router.policy import POLICIES, CacheAwareConfig


def normalize_worker_url(url: str) -> str:
    """``http(s)://host:port`` without a trailing slash; ValueError naming the field otherwise."""
    if not isinstance(url, str):
        raise ValueError(f"url: a string is required, got {type(url).__name__}")
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"url: expected http://host:port, got {url!r}")
    if u.query or u.fragment or u.path not in ("", "/"):
        raise ValueError(f"url: expected http://host:port with no path, got {url!r}")
    return f"{u.scheme}://{u.netloc}"


@dataclass(frozen=True)
class RouterArgs:
    worker_urls: tuple[str, ...] = ()
    policy: str = "cache_aware"
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    spread_threshold: int = 32
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    worker_api_key: Optional[str] = None
    health_check_interval_s: float = 2.0
    health_failure_threshold: int = 2
    connect_timeout_s: float = 5.0
    request_timeout_s: Optional[float] = None
    max_tree_chars: int = 1 << 24
    seed: Optional[int] = None
    log_level: str = "info"
    cache_aware: CacheAwareConfig = field(init=False, repr=False, compare=False, default=CacheAwareConfig())

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_urls", tuple(normalize_worker_url(u) for u in self.worker_urls))
        if len(set(self.worker_urls)) != len(self.worker_urls):
            raise ValueError(f"worker_urls: duplicates in {list(self.worker_urls)}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {self.policy!r}")
        object.__setattr__(self, "cache_aware", CacheAwareConfig(
            self.cache_threshold, self.balance_abs_threshold, self.balance_rel_threshold, self.spread_threshold))
        if self.health_check_interval_s <= 0:
            raise ValueError("health_check_interval_s must be > 0")
        if self.health_failure_threshold < 1:
            raise ValueError("health_failure_threshold must be >= 1")
        if self.max_tree_chars < 1:
            raise ValueError("max_tree_chars must be >= 1")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be > 0")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0 (or unset)")

    @property
    def effective_worker_api_key(self) -> Optional[str]:
        """The key the router sends to workers: --worker-api-key, else its own --api-key."""
        return self.worker_api_key if self.worker_api_key is not None else self.api_key


_HELP = {
    "worker_urls": "radixlm servers to route to (http://host:port ...); more can join via /add_worker",
    "policy": "routing policy",
    "cache_threshold": "cache_aware: least fraction of the prompt a worker's tree must match to be preferred",
    "balance_abs_threshold": "cache_aware: load-balance when the busiest worker has this many requests over the idlest ...",
    "balance_rel_threshold": "cache_aware: ... and this many times as many",
    "spread_threshold": "cache_aware: a hot prefix's worker with this many requests in flight shares it with an idler one",
    "host": "address to listen on",
    "port": "HTTP port",
    "api_key": "require 'Authorization: Bearer KEY' on every route but /health",
    "worker_api_key": "key sent to the workers (default: --api-key)",
    "health_check_interval_s": "seconds between health checks (and cache summaries) of each worker",
    "health_failure_threshold": "failed health checks in a row before a worker is taken out",
    "connect_timeout_s": "seconds to connect to a worker before failing over",
    "request_timeout_s": "seconds a worker may take to answer one request (default: no limit)",
    "max_tree_chars": "bound on each worker's tree (least recently used text goes first), whatever its summaries say",
    "seed": "seed of the random and power_of_two policies",
    "log_level": "logging level",
}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radixlm router",
                                description="A cache-aware router in front of several radixlm servers.")
    defaults = RouterArgs()
    for f in dataclasses.fields(RouterArgs):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kw: dict = {"dest": f.name, "help": _HELP[f.name] + " (default: %(default)s)", "default": default}
        if f.name == "worker_urls":
            kw.update(nargs="*", default=[])
        elif f.name == "policy":
            kw["choices"] = POLICIES
        elif f.name == "log_level":
            kw["choices"] = ("debug", "info", "warning", "error", "critical")
        elif isinstance(default, bool):
            raise AssertionError("no boolean router flags")
        elif f.name in ("cache_threshold", "balance_rel_threshold", "health_check_interval_s", "connect_timeout_s",
                        "request_timeout_s"):
            kw["type"] = float
        elif f.name in ("balance_abs_threshold", "spread_threshold", "port", "health_failure_threshold", "seed",
                        "max_tree_chars"):
            kw["type"] = int
        p.add_argument(flag, **kw)
    return p


def from_cli(argv: list[str]) -> RouterArgs:
    ns = make_parser().parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(RouterArgs) if f.init}
    values["worker_urls"] = tuple(values["worker_urls"])
    return RouterArgs(**values)
