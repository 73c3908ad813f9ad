"""The benchmarks' presets: `--quick` / `--standard` / the full sweep, as argparse defaults."""

from __future__ import annotations


def apply_preset(args, presets: dict[str, dict]) -> str:
    """Fill every option the user left unset (None) from the chosen preset; return its name."""
    name = "quick" if args.quick else "standard" if args.standard else "full"
    for key, value in presets[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return name
