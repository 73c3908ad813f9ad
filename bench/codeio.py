"""The code task's text handling: real Python files of installed packages, where to cut them,
and how a predicted line is scored (pure Python; the tokenizer is passed in).

Files come from the installed distributions named in ``PACKAGES`` (pinned by the set-up, so the
same files every time), sorted by path; a case draws one file and one cut with its own seed.
The cut lands just before a *non-trivial* line (LongBench's LCC: the next line of code to
predict): code by Python's own tokenizer (not inside a docstring, not a comment), not a lone
keyword or bracket, at least ``MIN_LINE`` chars.
"""

from __future__ import annotations

import importlib.metadata
import io
import random
import tokenize
from functools import lru_cache

PACKAGES = ("transformers", "sglang", "numpy", "scipy", "matplotlib", "torch")
MIN_LINE = 12
SKIP = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
TRIVIAL = {"else:", "try:", "finally:", "pass", "return", "break", "continue", ")", "]", "}", "):", "),", "],"}


def edit_similarity(pred: str, target: str) -> float:
    """1 - (insertions + deletions) / (len(pred) + len(target)) over characters of the stripped
    strings: the Indel ratio that ``fuzz.ratio`` (LongBench's code score) reports, over 1."""
    a, b = pred.strip(), target.strip()
    if not a and not b:
        return 1.0
    return 2 * _lcs(a, b) / (len(a) + len(b))


def _lcs(a: str, b: str) -> int:
    """Length of the longest common subsequence (O(len a * len b), lines are short)."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def first_code_line(reply: str) -> str:
    """LongBench's post-processing: the first line that is not blank, a comment or a fence."""
    for line in reply.lstrip("\n").split("\n"):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "`")):
            return stripped
    return ""


def nontrivial(line: str) -> bool:
    s = line.strip()
    return len(s) >= MIN_LINE and not s.startswith(("#", '"""', "'''")) and s not in TRIVIAL


@lru_cache(maxsize=1)
def source_files(min_chars: int = 40_000) -> tuple:
    """Paths of the installed packages' ``.py`` files of at least ``min_chars`` characters."""
    out = []
    for name in PACKAGES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if f.name.endswith(".py") and "/tests/" not in f"/{f}" and "test_" not in f.name:
                path = f.locate()
                if path.is_file() and path.stat().st_size >= min_chars:
                    out.append(path)
    return tuple(sorted(out, key=str))


def code_lines(text: str) -> set[int]:
    """0-based indices of the lines whose first token is code (a name, operator or number): not
    inside a string or docstring, not a comment. Empty when the file does not tokenize."""
    out, seen = set(), set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            row = tok.start[0] - 1
            if tok.type in SKIP or row in seen:
                continue
            seen.add(row)
            if tok.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER):
                out.add(row)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return set()
    return out


def cut(text: str, at_char: int, code: set[int] | None = None) -> tuple[str, str] | None:
    """The prefix up to the first non-trivial code line starting after ``at_char``, and that line
    (stripped); None when the rest of the text has none."""
    code = code_lines(text) if code is None else code
    lines = text.split("\n")
    row = text.count("\n", 0, at_char) + 1
    for i in range(row, len(lines)):
        if i in code and nontrivial(lines[i]):
            return "\n".join(lines[:i]) + "\n", lines[i].strip()
    return None


def sample_cut(tokenizer, n_tokens: int, rng: random.Random) -> tuple[str, str]:
    """A (prefix, next line) whose prefix is about ``n_tokens`` tokens, from a seeded file."""
    files = source_files()
    if not files:
        raise RuntimeError(f"no source files found in the installed packages {PACKAGES}")
    for path in rng.sample(files, len(files)):
        text = path.read_text(errors="replace")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) < n_tokens + 200:
            continue
        # leave ~24 tokens for the instruction and the cut's rounding to a line end
        found = cut(text, enc["offset_mapping"][n_tokens - 24][0])
        if found:
            return found
    raise RuntimeError(f"no installed source file holds {n_tokens} tokens")
