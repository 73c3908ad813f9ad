"""``python -m dkv_sglang.launch_server``: ``python -m sglang.launch_server`` plus --kv-* flags.

    python -m dkv_sglang.launch_server --model-path M --kv-policy dynamickv --kv-budget 256

A convenience wrapper: it validates our flags before anything loads, switches SGLang to its CPU
path on a machine without CUDA (which ``sglang serve`` cannot do for itself: see
:mod:`dkv_sglang.integration.sglang_cli`), then runs what ``python -m sglang.launch_server``
runs; the plugin's hook on SGLang's argument parsing does the rest, the same for both. The
server adds ``GET /dkv/stats``.
"""

from __future__ import annotations

import os
import sys

from .cli import split_argv, take_page_size
from .policy import PolicyConfigError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # fail fast, before SGLang is imported (the plugin's hook checks the same again)
        config, _, want_help = split_argv(argv)
        take_page_size(config, argv)
    except PolicyConfigError as e:
        print(f"dkv_sglang.launch_server: error: {e}", file=sys.stderr)
        return 2

    from . import machine

    machine.prepare()

    from sglang.srt.plugins import load_plugins

    load_plugins()
    # Imported after the plugin's hooks are applied (a local name would not be re-bound).
    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    if want_help:
        print("python -m dkv_sglang.launch_server: SGLang's server flags, ours in their own group "
              "(dkv-sglang KV-cache compression).\n")
        try:
            prepare_server_args(["--help"])
        except SystemExit:
            pass
        return 0
    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
