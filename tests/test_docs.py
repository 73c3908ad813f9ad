"""README.md and docs/: size, section order, links, no history numbers, and README's commands.

Cheap by design (seconds): the commands are checked against the code that runs them (the CLI
parser, the per-request parser, the Makefile, the benchmarks' argument parsers) and only
``--help`` is run; the engine-level behaviour behind them is what ``tests/engine`` covers.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_CHARS = 15_000

# The README's sections, in this order (issue 39).
SECTIONS = ["Two commands", "Running it", "Flags", "Per-request control", "Results at a glance",
            "How it works", "Limits", "Links"]
RESULTS = ["Throughput at equal memory", "Decode step", "Quality against SnapKV and full KV"]

# "s" "top" then a number, built from pieces so that this file does not match itself.
HISTORY_NUMBER = re.compile(("s" + "top") + r"s?[\s_-]*\d", re.IGNORECASE)


def text() -> str:
    return README.read_text()


def outside_fences(md: str) -> list[str]:
    lines, fence = [], False
    for line in md.split("\n"):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def code_blocks(md: str, lang: str | None = None) -> list[str]:
    """The bodies of md's fenced blocks (of one language: "" for a plain fence)."""
    blocks = re.findall(r"^```([a-z]*)\n(.*?)^```", md, flags=re.M | re.S)
    return [body for fence, body in blocks if lang is None or fence == lang]


def commands(md: str) -> list[list[str]]:
    """Every shell command in README's plain code blocks (continuation lines joined), as argv."""
    out = []
    for block in code_blocks(md, ""):
        pending = ""
        for line in block.replace("\\\n", " ").split("\n"):
            pending += line + "\n"
            try:  # a quoted argument (curl's -d '...') may span lines, as in a shell
                argv = shlex.split(pending, comments=True)
            except ValueError:
                continue
            pending = ""
            if argv:
                out.append(argv)
        assert not pending.strip(), pending
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(md: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in outside_fences(md):
        m = re.match(r"#+ (.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_short():
    assert len(text()) <= MAX_README_CHARS, f"README.md has {len(text())} characters"


def test_readme_sections_in_order():
    lines = outside_fences(text())
    assert lines[0] == "# dkv-sglang"
    h2 = [line[3:] for line in lines if line.startswith("## ")]
    assert h2 == SECTIONS
    intro = "\n".join(lines[1:lines.index("## Two commands")]).strip()
    assert intro and "\n\n" not in intro, "what it is and why: one paragraph"
    results = lines[lines.index("## Results at a glance"):lines.index("## How it works")]
    assert [line[4:] for line in results if line.startswith("### ")] == RESULTS


def test_each_result_has_one_table_a_command_and_a_link():
    md = text()
    parts = re.split(r"^### ", md.split("## How it works")[0], flags=re.M)[1:]
    assert len(parts) == len(RESULTS)
    for part in parts:
        tables = re.findall(r"(?:^\|.*\n)+", part, flags=re.M)
        assert len(tables) == 1, part.split("\n")[0]
        assert "make bench-" in part, part.split("\n")[0]
        assert "](docs/" in part, part.split("\n")[0]


DOCS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("path", ["README.md", *DOCS])
def test_relative_links_resolve(path):
    md = (ROOT / path).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(outside_fences(md))):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (ROOT / path).parent / file if file else ROOT / path
        assert dest.exists(), f"{path}: {target}"
        if anchor:
            assert anchor in anchors(dest.read_text()), f"{path}: {target}"


def test_no_history_numbers_in_tracked_files():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    hits = []
    for name in filter(None, files.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            body = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}: {m.group(0)!r}" for m in HISTORY_NUMBER.finditer(body)]
    assert not hits, "name runs by their command and result file, not a history number:\n" + "\n".join(hits)


# README's commands ---------------------------------------------------------------------------

def flag_rows() -> list[tuple[str, str | None, str]]:
    """(flag, its {choices} or None, default) from README's flags table."""
    rows = []
    for line in text().split("## Flags")[1].split("\n## ")[0].split("\n"):
        m = re.match(r"\| `(--[a-z-]+)(?: \{([a-z,]+)\}| N)?` \|.*\| `?([a-z0-9]+)`? \|$", line)
        if m:
            rows.append(m.groups())
    return rows


def test_flags_table_matches_the_cli():
    from dkv_sglang.cli import FLAGS, _dest, config_from_options, parser
    from dkv_sglang.policy import PolicyConfig, PolicyConfigError

    rows = flag_rows()
    assert [r[0] for r in rows] == [*FLAGS, "--page-size"], "every flag, in the CLI's order"
    options = {s for a in parser()._actions for s in a.option_strings}
    defaults = PolicyConfig()
    for flag, choices, default in rows:
        if flag == "--page-size":
            assert default == "1"
            continue
        assert flag in options
        field = FLAGS[flag][0]
        assert str(getattr(defaults, field)) == default, flag
        if choices:
            for value in choices.split(","):
                assert getattr(config_from_options(**{_dest(flag): value}), field) == value
            with pytest.raises(PolicyConfigError):
                config_from_options(**{_dest(flag): "no-such-value"})


def test_launcher_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "dkv_sglang.launch_server", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag, _, _ in flag_rows():
        assert flag in out.stdout, flag


def test_server_commands_parse():
    from dkv_sglang.cli import split_argv

    model = re.search(r"^MODEL := (\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    servers = [c for c in commands(text())
               if "dkv_sglang.launch_server" in c or c[1:3] == [".venv/bin/sglang", "serve"]]
    assert len(servers) >= 4
    for argv in servers:
        if argv[0].startswith("SGLANG_USE_CPU_ENGINE="):
            argv = argv[1:]
            assert argv[:2] == [".venv/bin/sglang", "serve"]
            assert (Path(sys.executable).parent / "sglang").exists()
        rest = argv[argv.index("dkv_sglang.launch_server") + 1:] if "-m" in argv else argv[2:]
        cfg, sglang_args, _ = split_argv(rest)
        assert (cfg.policy, cfg.budget) == ("dynamickv", 128)
        assert sglang_args[:2] == ["--model-path", model], "the model `make setup` converts"


def test_python_modules_exist():
    for argv in commands(text()):
        if "-m" in argv and "python" in argv[argv.index("-m") - 1]:
            module = argv[argv.index("-m") + 1]
            assert importlib.util.find_spec(module) is not None, module


def test_make_targets_run_as_written():
    for argv in commands(text()):
        if argv[0] == "make":
            out = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, (argv, out.stderr)
            for arg in argv[2:]:
                name, _, value = arg.partition("=")
                assert value in out.stdout, f"make {argv[1]} ignores {name}"


def test_ruler_command_parses():
    from bench.ruler import parse

    [argv] = [c for c in commands(text()) if c[:2] == ["make", "bench-ruler"]]
    args = parse(shlex.split(argv[2].partition("=")[2]))
    assert args.quick and args.name == "next26-r-smollm2" and args.budgets == [32, 64, 128, 256]


def test_engine_snippet():
    from dkv_sglang.cli import config_from_options

    [snippet] = code_blocks(text(), "python")
    calls = [n for n in ast.walk(ast.parse(snippet)) if isinstance(n, ast.Call)]
    [engine] = [c for c in calls if ast.unparse(c.func) == "dkv_sglang.Engine"]
    options = {k.arg: ast.literal_eval(k.value) for k in engine.keywords}
    assert options.pop("model_path") == "models/smollm2"
    cfg = config_from_options(**options)
    assert (cfg.policy, cfg.budget) == ("dynamickv", 128)
    # The call tests/engine makes: dkv_sglang.Engine(model_path=..., kv_policy=..., kv_budget=...).
    methods = {ast.unparse(c.func).split(".")[-1] for c in calls} - {"Engine", "print"}
    assert methods == {"generate", "dkv_stats"}
    engine_src = (ROOT / "dkv_sglang" / "engine.py").read_text()
    assert "class Engine(" in engine_src and "def dkv_stats(" in engine_src


def curl_bodies() -> list[tuple[str, dict]]:
    out = []
    for argv in commands(text()):
        if argv[0] == "curl":
            url = next(a for a in argv if a.startswith("127.0.0.1:"))
            body = json.loads(argv[argv.index("-d") + 1]) if "-d" in argv else None
            out.append((url.split("/", 1)[1], body))
    return out


def test_curl_lines_are_valid_requests():
    from dkv_sglang.policy import PolicyConfig
    from dkv_sglang.policy.request import for_request, from_labels

    server = PolicyConfig(policy="dynamickv", budget=128)
    routes = {"generate", "dkv/stats", "v1/chat/completions"}
    seen = set()
    for route, body in curl_bodies():
        assert route in routes, route
        seen.add(route)
        if body is None:
            continue
        params = body.get("sampling_params", {}).get("custom_params")
        labels = body.get("custom_labels") or body.get("metadata")
        if params:
            assert for_request(server, params).policy == "snapkv"
        if labels:
            assert for_request(server, from_labels(labels, "custom_labels")).budget == 64
    assert seen == routes
    assert '"/dkv/stats"' in (ROOT / "dkv_sglang" / "integration" / "http.py").read_text()
