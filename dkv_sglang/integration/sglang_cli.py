"""Our --kv-* flags on SGLang's own commands: ``sglang serve`` and ``python -m sglang.launch_server``.

Both load plugins, then call ``sglang.srt.server_args.prepare_server_args(argv)``, which builds
its parser with ``ServerArgs.add_cli_args``. Two hooks (registered by the plugin in every
process, acting only where a command line is parsed):

- ``ServerArgs.add_cli_args``: adds our flags, as their own group, to SGLang's parser (``--help``);
- ``prepare_server_args``: when ``argv`` names any of our flags, validates them (exit 2 naming the
  flag, before any model loads), publishes the config to the processes SGLang will spawn, adds
  the SGLang settings the policy and this machine need (:func:`dkv_sglang.cli.engine_defaults`)
  and hands SGLang the rest (our flags may also sit in SGLang's ``--config`` YAML file).
  Without our flags ``argv`` goes to SGLang untouched.

``python -m dkv_sglang.launch_server`` goes through the same hook.
"""

from __future__ import annotations

import os
import sys

from .. import cli
from ..policy import PolicyConfigError

PROG = "sglang serve"  # SGLang's parser names itself so for both entry points
CPU_VAR = "SGLANG_USE_CPU_ENGINE"

_ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
_PREPARE = "sglang.srt.server_args.prepare_server_args"


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_ADD_CLI_ARGS, _add_kv_group, HookType.AFTER)
    HookRegistry.register(_PREPARE, _prepare_with_kv_flags, HookType.AROUND)


def _add_kv_group(result, parser):
    cli.add_flags(parser.add_argument_group(cli.GROUP_TITLE, cli.GROUP_DESCRIPTION))
    return result


def _prepare_with_kv_flags(original, argv):
    asked = list(argv)
    argv = _merge_config_file(asked)
    try:
        config, rest, want_help = cli.split_argv(argv)
        page_size, rest = cli.take_page_size(config, rest)
    except PolicyConfigError as e:
        _usage_error(str(e))
    if want_help or not cli.kv_flags_given(argv):
        return original(asked)  # SGLang's own parser prints help with our group; or vanilla
    on_cpu = _cpu_path()
    from . import settings

    settings.publish(config)
    settings.publish_page_size(page_size)
    _register_policy_hooks()
    from .http import add_routes

    add_routes()
    server_args = original(cli.sglang_argv(config, rest, on_cpu, page_size))
    from sglang.srt.sampling.watermarking.core import redact_watermark_command_line

    # What was asked for, our flags included (SGLang records the argv it parsed).
    server_args._launch_command = redact_watermark_command_line(asked, server_args.watermark_config)
    return server_args


def _merge_config_file(argv: list[str]) -> list[str]:
    """``--config FILE.yaml`` merged into ``argv`` as SGLang merges it, so our flags may be
    given there too (SGLang's parser, holding our group, would otherwise drop them silently)."""
    if "--config" not in argv:
        return argv
    import argparse

    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

    parser = argparse.ArgumentParser(prog=PROG)
    ServerArgs.add_cli_args(parser)
    return ConfigArgumentMerger(parser).merge_config_with_args(argv)


def _cpu_path() -> bool:
    """True on SGLang's CPU path. Without CUDA that path needs ``SGLANG_USE_CPU_ENGINE=1`` set
    before Python starts (SGLang reads it at import time): refuse, saying so, when it is not."""
    from .. import machine

    if os.environ.get(CPU_VAR) != "1" and not machine.has_cuda():
        _usage_error(
            f"no CUDA device here, and SGLang's CPU path needs {CPU_VAR}=1 in the environment before "
            f"Python starts; run `{CPU_VAR}=1 {PROG} ...` (with our flags the plugin then adds "
            "--device cpu --attention-backend torch_native --mem-fraction-static 0.3 unless you give "
            "them), or `python -m dkv_sglang.launch_server ...`, which sets it"
        )
    return machine.prepare()


def _register_policy_hooks() -> None:
    """The plugin ran before the config was published here, as vanilla: register again under
    it (targets already patched are skipped) so this process resolves its server arguments as
    ``python -m dkv_sglang.launch_server`` does (e.g. FlashInfer as the default on CUDA)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from .plugin import register

    register()
    HookRegistry.apply_hooks()


def _usage_error(message: str):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)
