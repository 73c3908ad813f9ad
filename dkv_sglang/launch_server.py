"""``python -m dkv_sglang.launch_server``: ``python -m sglang.launch_server`` plus --kv-* flags.

    python -m dkv_sglang.launch_server --model-path M --kv-policy dynamickv --kv-budget 256

Our flags are validated before anything loads; every other flag is SGLang's. The server adds
``GET /dkv/stats``.
"""

from __future__ import annotations

import os
import sys

from .cli import engine_defaults, parser, split_argv, take_page_size
from .policy import PolicyConfigError


def _given_fields(argv: list[str]) -> set[str]:
    return {w[2:].split("=")[0].replace("-", "_") for w in argv if w.startswith("--")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, rest, want_help = split_argv(argv)
        page_size, rest = take_page_size(config, rest)
    except PolicyConfigError as e:
        print(f"dkv_sglang.launch_server: error: {e}", file=sys.stderr)
        return 2
    if want_help:
        parser().print_help()
        print("\nSGLang's own flags follow.\n")
        rest = rest + ["--help"]

    from . import machine
    from .integration import settings

    on_cpu = machine.prepare()
    settings.publish(config)
    settings.publish_page_size(page_size)
    for field, value in engine_defaults(config, _given_fields(rest), on_cpu, page_size).items():
        flag = "--" + field.replace("_", "-")
        rest += [flag] if value is True else [flag, str(value)]

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from .integration.http import add_routes

    load_plugins()
    server_args = prepare_server_args(rest)
    add_routes()
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
