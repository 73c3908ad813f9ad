"""The quality benchmark's cases: prompts built to a token length, with answers scored exactly.

Every prompt is one chat turn: essay filler with sentences planted in it, then the question.
The reply is free text; the answer words come several tokens into it (the model restates the
question first), so they are generated from the compressed cache, not from the full-KV prefill
that produces the first token (DESIGN 7). ``Result.answer_first`` records when that fails.

Tasks:

- ``niah``: one needle ("The secret password for the vault is W.") at a depth; answer W.
- ``multikey``: four similar needles ("The code word for the red locker is W.") at spread
  depths; asked for one locker; correct if its word is in the reply and no other locker's is.
- ``spread``: three facts ("One of the secret passwords for the vault is W.") spread evenly
  over the context; asked for the three passwords; correct only if all three are in the reply.
  (A first form, three names of "members of the secret club", failed at full KV on both models:
  they listed people from the essays.)

- ``followup``: ``niah`` asked the way a chat asks it: the document is sent first (its own
  request, so SGLang's prefix cache holds it), then the question arrives as a follow-up turn
  (document, a short assistant turn, the question). The compressing policies score the
  follow-up's own prompt, so the question is inside their observation window.
- ``cwe``: aggregation (RULER's common-words form): a numbered list of essay words in which three
  words appear far more often than the rest; asked for the three. Graded: the share of the three
  in the reply (``correct`` only when all three are).
- ``code``: LongBench's LCC form on real Python files of installed packages (transformers,
  sglang, numpy, ...): a file prefix cut just before a non-trivial line; the first non-empty,
  non-comment line of the reply is scored by edit similarity (``codeio.edit_similarity``).
- ``continuation``: raw essay text, continued for 32 greedy tokens; scored against full KV's own
  32 tokens (share of positions that agree; first divergence kept too). Full KV scores 1 by
  definition, so this task shows only how far each policy drifts.

Values are drawn with a seed from the case's own name, so the same arguments always build the
same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from . import codeio, haystack

TASKS = ("niah", "multikey", "spread", "followup", "cwe", "code", "continuation")
# Reply tokens per task: room for the restated question and the answer words, no more (on a
# CPU every decode step of every request costs).
REPLY_TOKENS = {"niah": 16, "multikey": 16, "spread": 32, "followup": 16, "cwe": 32, "code": 24,
                "continuation": 32}
# Tasks scored against something other than fixed answer words.
GRADED = ("cwe", "code", "continuation")

WORDS = (
    "lighthouse", "saxophone", "avalanche", "pineapple", "telescope", "volcano", "harmonica",
    "porcupine", "lantern", "glacier", "compass", "tornado", "cathedral", "accordion", "octopus",
    "meteorite", "submarine", "cactus", "waterfall", "kangaroo", "trombone", "iceberg", "parachute",
    "dinosaur", "chandelier", "hedgehog", "flamingo", "typewriter", "peacock", "canyon",
)
_COUNT = {2: "two", 3: "three", 4: "four", 5: "five"}
LOCKERS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "black")


@dataclass(frozen=True)
class Case:
    """One prompt. ``answers`` must all appear in the reply, ``distractors`` none of them."""

    task: str
    length: int  # requested prompt length in tokens
    depth: float | None  # the needle's depth (niah), else None
    seed: int
    prompt_ids: tuple[int, ...] = field(repr=False)
    answers: tuple[str, ...]
    distractors: tuple[str, ...] = ()
    warm_ids: tuple[int, ...] = field(default=(), repr=False)  # sent first, once (followup)

    @property
    def name(self) -> str:
        depth = "" if self.depth is None else f"-d{round(self.depth * 100)}"
        return f"{self.task}-{self.length}{depth}-s{self.seed}"


def score(case: Case, reply: str) -> bool:
    """Exact match: every answer is a whole word of the reply and no distractor is."""
    return all(_has(reply, a) for a in case.answers) and not any(_has(reply, d) for d in case.distractors)


def graded(case: Case, reply: str) -> float:
    """A score in [0, 1]: the share of answer words (cwe), edit similarity (code), else 0/1."""
    if case.task == "cwe":
        return sum(_has(reply, a) for a in case.answers) / len(case.answers)
    if case.task == "code":
        return codeio.edit_similarity(codeio.first_code_line(reply), case.answers[0])
    return float(score(case, reply))


def agreement(reply_ids, reference_ids) -> tuple[float, int]:
    """Share of positions where ``reply_ids`` equals ``reference_ids``, and the first position
    where they differ (``len(reference_ids)`` when none does)."""
    ref = list(reference_ids)
    if not ref:
        return 1.0, 0
    got = list(reply_ids)[:len(ref)]
    same = [i < len(got) and got[i] == t for i, t in enumerate(ref)]
    first = same.index(False) if False in same else len(ref)
    return sum(same) / len(ref), first


def answer_first(case: Case, reply: str) -> bool:
    """Whether the reply opens with an answer word (then the full-KV prefill produced it)."""
    first = reply.strip().split(maxsplit=1)[:1]
    return bool(first) and any(_has(first[0], a) for a in case.answers)


def _has(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word.lower())}\b", text.lower()) is not None


def niah(tokenizer, length: int, depth: float, seed: int = 0) -> Case:
    rng = random.Random(f"niah-{length}-{depth}-{seed}")
    word = rng.choice(WORDS)
    sentences = [(depth, f"The secret password for the vault is {word}.")]
    question = "What is the secret password for the vault?"
    return _case(tokenizer, rng, "niah", length, depth, seed, sentences, question, (word,))


def multikey(tokenizer, length: int, seed: int = 0, keys: int = 4) -> Case:
    rng = random.Random(f"multikey-{length}-{seed}")
    lockers, words = rng.sample(LOCKERS, keys), rng.sample(WORDS, keys)
    depths = _spread_depths(rng, keys)
    sentences = [(d, f"The code word for the {lk} locker is {w}.") for d, lk, w in zip(depths, lockers, words)]
    asked = rng.randrange(keys)
    question = f"What is the code word for the {lockers[asked]} locker?"
    others = tuple(w for i, w in enumerate(words) if i != asked)
    return _case(tokenizer, rng, "multikey", length, None, seed, sentences, question, (words[asked],), others)


def spread(tokenizer, length: int, seed: int = 0, facts: int = 3) -> Case:
    rng = random.Random(f"spread-{length}-{seed}")
    words = rng.sample(WORDS, facts)
    depths = _spread_depths(rng, facts)
    sentences = [(d, f"One of the secret passwords for the vault is {w}.") for d, w in zip(depths, words)]
    question = f"What are the {_COUNT[facts]} secret passwords for the vault?"
    return _case(tokenizer, rng, "spread", length, None, seed, sentences, question, tuple(words))


def _spread_depths(rng: random.Random, n: int) -> list[float]:
    """``n`` depths, one in each of ``n`` equal slices of (0.1, 0.9), shuffled."""
    width = 0.8 / n
    return [0.1 + width * (i + rng.uniform(0.25, 0.75)) for i in range(n)]


def _case(tokenizer, rng, task, length, depth, seed, sentences, question, answers, distractors=()) -> Case:
    offset = rng.randrange(0, 20_000)
    context_tokens = length
    for _ in range(3):  # the template, question and planted sentences cost tokens too
        ids = _prompt_ids(tokenizer, offset, context_tokens, sentences, question)
        context_tokens += length - len(ids)
    return Case(task, length, depth, seed, tuple(ids), tuple(answers), tuple(distractors))


def _prompt_ids(tokenizer, offset: int, context_tokens: int, sentences, question: str) -> list[int]:
    context = haystack.plant(haystack.filler(tokenizer, context_tokens, offset), sentences)
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def followup(tokenizer, length: int, depth: float, seed: int = 0) -> Case:
    """``niah``'s document and question, the question as a second user turn after the document."""
    rng = random.Random(f"followup-{length}-{depth}-{seed}")
    word = rng.choice(WORDS)
    sentences = [(depth, f"The secret password for the vault is {word}.")]
    offset = rng.randrange(0, 20_000)
    question = "What is the secret password for the vault?"
    context_tokens = length
    for _ in range(3):
        context = haystack.plant(haystack.filler(tokenizer, offset=offset, n_tokens=context_tokens), sentences)
        turns = [{"role": "user", "content": context},
                 {"role": "assistant", "content": "I have read the document. What is your question?"},
                 {"role": "user", "content": question}]
        ids = _chat_ids(tokenizer, turns)
        context_tokens += length - len(ids)
    warm = _chat_ids(tokenizer, turns[:1])
    return Case("followup", length, depth, seed, tuple(ids), (word,), warm_ids=tuple(warm))


def cwe(tokenizer, length: int, seed: int = 0, common: int = 3, freq_common: int = 20, freq_rare: int = 2) -> Case:
    """A numbered word list: ``common`` words ``freq_common`` times each, the rest ``freq_rare``."""
    rng = random.Random(f"cwe-{length}-{seed}")
    vocab = haystack.vocabulary()
    picked = rng.sample(vocab, len(vocab))
    top, rare = picked[:common], iter(picked[common:])
    question = (f"What are the {_COUNT[common]} most common words in the list above? "
                "Answer with the words only.")
    words = [w for w in top for _ in range(freq_common)]
    best = _cwe_ids(tokenizer, words, common, question)
    while True:  # add rare words while the prompt fits, a few at a time when far from full
        step = max(1, (length - len(best)) // (8 * freq_rare))
        candidate = words + [w for _ in range(step) for w in [next(rare)] * freq_rare]
        rng.shuffle(candidate)
        ids = _cwe_ids(tokenizer, candidate, common, question)
        if len(ids) > length:
            break
        words, best = candidate, ids
    return Case("cwe", length, None, seed, tuple(best), tuple(top))


def _cwe_ids(tokenizer, words, common, question) -> list[int]:
    listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    text = (f"Below is a numbered list of words. Some of them appear more often than the others: "
            f"remember the {_COUNT[common]} that appear most often.\n{listing}\n\n{question}")
    return _chat_ids(tokenizer, [{"role": "user", "content": text}])


def code(tokenizer, length: int, seed: int = 0) -> Case:
    """LCC: a real source file's prefix of about ``length`` tokens; the answer is the next line."""
    rng = random.Random(f"code-{length}-{seed}")
    prefix, line = codeio.sample_cut(tokenizer, length, rng)
    text = f"Please complete the code given below. \n{prefix}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Case("code", length, None, seed, tuple(ids), (line,))


def continuation(tokenizer, length: int, seed: int = 0) -> Case:
    """Raw essay text (no chat turn) cut at ``length`` tokens, to be continued."""
    rng = random.Random(f"continuation-{length}-{seed}")
    offset = rng.randrange(0, 20_000)
    ids = tokenizer(haystack.filler(tokenizer, length, offset), add_special_tokens=False)["input_ids"]
    return Case("continuation", length, None, seed, tuple(ids[:length]), ())


def _chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build(tokenizer, tasks, lengths, depths, seeds) -> list[Case]:
    """Every case of a sweep: niah and followup over lengths x depths x seeds, the others over
    lengths x seeds x depths too (one case per depth slot, so every task has as many cases)."""
    out = []
    for length in lengths:
        for seed in seeds:
            if "niah" in tasks:
                out += [niah(tokenizer, length, d, seed) for d in depths]
            if "followup" in tasks:
                out += [followup(tokenizer, length, d, seed) for d in depths]
            if "multikey" in tasks:
                out.append(multikey(tokenizer, length, seed))
            if "spread" in tasks:
                out.append(spread(tokenizer, length, seed))
            slots = [seed * len(depths) + i for i in range(len(depths))]
            if "cwe" in tasks:
                out += [cwe(tokenizer, length, s) for s in slots]
            if "code" in tasks:
                out += [code(tokenizer, length, s) for s in slots]
            if "continuation" in tasks:
                out += [continuation(tokenizer, length, s) for s in slots]
    return out
