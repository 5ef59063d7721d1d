"""The ``radixlm`` command: ``make-tiny-model``, ``serve``, ``router`` and ``--version``."""

from __future__ import annotations

import argparse
import sys

from radixlm.runtime.child_process import isolate_sys_path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("radixlm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        import radixlm

        return radixlm.__version__


def main(argv: list[str] | None = None) -> None:
    isolate_sys_path()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="radixlm", description="radixlm structured generation runtime")
    parser.add_argument("--version", action="version", version=f"radixlm {_version()}")
    from radixlm.runtime.tiny_chat_templates import FAMILIES

    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a small random Hugging Face model directory")
    p.add_argument("dir")
    p.add_argument("--arch", choices=["llama", "qwen2", "mistral"], default="llama")
    p.add_argument("--preset", choices=["tiny", "tiny64", "small"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template-family", choices=sorted(FAMILIES), default="chatml",
                   help="chat template to write: ChatML, or a tool-calling / reasoning family (default: chatml)")

    sub.add_parser("serve", help="start the HTTP + ZeroMQ server (see `radixlm serve --help`)", add_help=False)

    sub.add_parser("router", help="start a cache-aware router over radixlm servers (see `radixlm router --help`)",
                   add_help=False)

    if argv and argv[0] == "router":
        from radixlm.router.server import main as router_main

        router_main(argv[1:])
        return
    if argv and argv[0] == "serve":
        from radixlm.runtime.server.launcher import main as serve_main

        serve_main(argv[1:])
        return
    args = parser.parse_args(argv)
    if args.command == "make-tiny-model":
        from radixlm.runtime.tiny_model import make_tiny_model

        make_tiny_model(args.dir, arch=args.arch, preset=args.preset, seed=args.seed,
                        chat_template_family=args.chat_template_family)
        print(f"wrote {args.arch} ({args.preset}) model to {args.dir}")


if __name__ == "__main__":
    main()
