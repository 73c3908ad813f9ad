"""Our flags: taken out of argv, validated before any model loads; the rest goes to SGLang.

:func:`add_flags` defines the flags once, for our launcher's parser and for the group the
plugin adds to SGLang's own (``sglang serve``, ``python -m sglang.launch_server``).
:func:`split_argv` turns command-line words into a :class:`PolicyConfig` plus SGLang's own
arguments; :func:`engine_defaults` is the one place that decides the SGLang settings a policy
or this machine needs. Nothing here imports SGLang.
"""

from __future__ import annotations

import argparse
import logging

from .policy import POLICIES, PolicyConfig, PolicyConfigError
from .policy.config import ALLOCATIONS, HEAD_BUDGETS, POOLINGS

_DEFAULTS = PolicyConfig()

# flag -> (PolicyConfig field, type, help)
FLAGS = {
    "--kv-policy": ("policy", str, f"KV policy: {', '.join(POLICIES)} (full = vanilla SGLang)"),
    "--kv-budget": ("budget", int, ("average KV rows kept per layer per request, window included; "
                                    "prompts of at most this many tokens are not compressed")),
    "--kv-window": ("window", int, "observation window ws: last prompt tokens whose queries score the rest"),
    "--kv-kernel": ("kernel", int, "1-D pooling kernel over the scores (odd)"),
    "--kv-pooling": ("pooling", str, f"pooling type: {', '.join(POOLINGS)}"),
    "--kv-rmax": ("rmax", int, "DynamicKV r_max: rows a layer holds before its budget is fixed, x base"),
    "--kv-update-interval": ("update_interval", int, "DynamicKV m: re-decide budgets every m layers"),
    "--kv-allocation": ("allocation", str, (
        f"DynamicKV's layer budgets from the global top-k: {', '.join(ALLOCATIONS)} "
        f"(default {PolicyConfig.allocation}; reference = the paper's; README 'Allocations')")),
    "--kv-head-budgets": ("head_budgets", str, (
        f"how a layer's rows are shared by its KV heads: {', '.join(HEAD_BUDGETS)} "
        "(adaptive = Ada-KV: one top-k over the layer's heads, on contrast; shares = the same top-k "
        "on each head's share of its mass, lost SmolLM2's retrieval; max = each head the larger of "
        "those two counts; dynamickv, snapkv, pyramidkv)")),
}


GROUP_TITLE = "dkv-sglang KV-cache compression"
GROUP_DESCRIPTION = (
    "Flags of the dkv-sglang plugin. With a compressing policy --page-size N is the dkv pool's page "
    "size (head-rows per physical page) and SGLang's own stays 1; with full it is SGLang's, untouched."
)


def add_flags(group) -> None:
    """Add the --kv-* flags to ``group`` (an argparse parser or argument group): the one
    definition behind our launcher's parser and the group the plugin adds to SGLang's."""
    for flag, (field, _, text) in FLAGS.items():
        # Values are parsed as strings and converted in one place, so errors name the flag.
        group.add_argument(flag, dest=_dest(flag), default=None, metavar=field.upper(),
                           help=f"{text} (default: {getattr(_DEFAULTS, field)})")


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dkv_sglang.launch_server",
        description="SGLang's server with DynamicKV KV-cache compression. Every flag not listed "
        "here is SGLang's own (python -m sglang.launch_server --help).",
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help (and SGLang's) and exit")
    add_flags(p.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION))
    return p


def _convert(flag: str, raw: str):
    _, typ, _ = FLAGS[flag]
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise PolicyConfigError(flag, f"expected an integer, got {raw!r}") from None
    return raw


def config_from_options(**options) -> PolicyConfig:
    """Build the config from keyword options (``kv_budget=...`` or ``budget=...``)."""
    fields = {}
    for flag, (field, typ, _) in FLAGS.items():
        for key in (flag[2:].replace("-", "_"), field):
            if key in options and options[key] is not None:
                value = options[key]
                fields[field] = _convert(flag, value) if isinstance(value, str) and typ is int else value
    return PolicyConfig(**fields)


def split_argv(argv: list[str]) -> tuple[PolicyConfig, list[str], bool]:
    """(config, SGLang's argv, help asked). Raises PolicyConfigError naming the bad flag."""
    ns, rest = parser().parse_known_args(argv)
    converted = {}
    for flag, (field, _, _) in FLAGS.items():
        raw = getattr(ns, _dest(flag))
        if raw is not None:
            converted[field] = _convert(flag, raw)
    return PolicyConfig(**converted), rest, ns.help


def kv_flags_given(argv: list[str]) -> bool:
    """Whether ``argv`` names any of our flags (without them SGLang's commands stay vanilla)."""
    ns, _ = parser().parse_known_args(argv)
    return any(getattr(ns, _dest(flag)) is not None for flag in FLAGS)


def given_fields(argv: list[str]) -> set[str]:
    """The ServerArgs fields ``argv`` sets (``--max-total-tokens 9`` -> ``max_total_tokens``)."""
    return {w[2:].split("=")[0].replace("-", "_") for w in argv if w.startswith("--")}


def check_page_size(raw) -> int:
    """The dkv pool's page size (head-rows per physical page, FlashInfer's page size)."""
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise PolicyConfigError("--page-size", f"expected an integer, got {raw!r}") from None
    if value < 1:
        raise PolicyConfigError("--page-size", f"must be at least 1, got {value}")
    return value


def take_page_size(config: PolicyConfig, argv: list[str]) -> tuple[int, list[str]]:
    """With a compressing policy, ``--page-size N`` is the dkv pool's (rows per physical page)
    and SGLang gets ``--page-size 1`` (its token ids stay per token). With ``full`` it is
    SGLang's, untouched. Returns (the pool's page size, SGLang's argv)."""
    if not config.compresses:
        return 1, argv
    out, page_size, i = [], 1, 0
    while i < len(argv):
        word = argv[i]
        if word == "--page-size":
            if i + 1 >= len(argv):
                raise PolicyConfigError("--page-size", "expected a value")
            page_size, i = check_page_size(argv[i + 1]), i + 2
            continue
        if word.startswith("--page-size="):
            page_size = check_page_size(word.split("=", 1)[1])
        else:
            out.append(word)
        i += 1
    if page_size > 1:
        out += ["--page-size", "1"]
    return page_size, out


logger = logging.getLogger("dkv_sglang")


def engine_defaults(config: PolicyConfig, given: set[str], on_cpu: bool, page_size: int = 1) -> dict:
    """SGLang settings to add (by ServerArgs field name) unless the user gave them.

    ``page_size``: the dkv pool's (see :func:`take_page_size`); above 1 the radix prefix cache
    is turned off (its prefixes would have to end on page boundaries; not built yet).
    """
    out = {}
    if config.compresses and page_size > 1:
        out.update(disable_radix_cache=True)
    if on_cpu:
        out.update(device="cpu", attention_backend="torch_native", mem_fraction_static=0.3)
    # Otherwise overlap scheduling and the radix prefix cache stay as SGLang sets them: a prefill that
    # cuts is ordered before the next batch (integration/overlap.py), and the cache keeps
    # prompts whole (each request copies out the rows it keeps).
    out = {k: v for k, v in out.items() if k not in given}
    if "disable_radix_cache" in out:
        logger.warning("dkv-sglang: --page-size %d turns off the radix prefix cache (page size 1 keeps it)", page_size)
    return out


def sglang_argv(config: PolicyConfig, argv: list[str], on_cpu: bool, page_size: int = 1) -> list[str]:
    """SGLang's argv (our flags already taken out) plus the :func:`engine_defaults` it lacks."""
    out = list(argv)
    for field, value in engine_defaults(config, given_fields(argv), on_cpu, page_size).items():
        flag = "--" + field.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out
