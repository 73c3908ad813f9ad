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

Values are concrete nouns drawn with a seed from the case's own name, so the same arguments
always build the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from . import haystack

TASKS = ("niah", "multikey", "spread")
# Reply tokens per task: room for the restated question and the answer words, no more (on a
# CPU every decode step of every request costs).
REPLY_TOKENS = {"niah": 16, "multikey": 16, "spread": 32}

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

    @property
    def name(self) -> str:
        depth = "" if self.depth is None else f"-d{round(self.depth * 100)}"
        return f"{self.task}-{self.length}{depth}-s{self.seed}"


def score(case: Case, reply: str) -> bool:
    """Exact match: every answer is a whole word of the reply and no distractor is."""
    return all(_has(reply, a) for a in case.answers) and not any(_has(reply, d) for d in case.distractors)


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


def build(tokenizer, tasks, lengths, depths, seeds) -> list[Case]:
    """Every case of a sweep: niah over lengths x depths x seeds, the others over lengths x seeds."""
    out = []
    for length in lengths:
        for seed in seeds:
            if "niah" in tasks:
                out += [niah(tokenizer, length, d, seed) for d in depths]
            if "multikey" in tasks:
                out.append(multikey(tokenizer, length, seed))
            if "spread" in tasks:
                out.append(spread(tokenizer, length, seed))
    return out
