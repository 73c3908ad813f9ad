"""The quality benchmark's prompts: needles at the requested depth and token length, exact scoring."""

from __future__ import annotations

import pytest

from bench import haystack, tasks


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from runtime.prepare_model import prepare

    return AutoTokenizer.from_pretrained(prepare("smollm2"))


def context_depth(tokenizer, case, sentence: str) -> float:
    """Where ``sentence`` sits in the prompt's context, in tokens, as a fraction of the context."""
    text = tokenizer.decode(case.prompt_ids)
    start = text.index("user\n") + len("user\n")
    end = text.rindex("\n\n")
    at = text.index(sentence)
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])
    return count(text[start:at]) / count(text[start:end])


@pytest.mark.parametrize("length", [1000, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_niah_needle_at_requested_depth_and_length(tokenizer, length, depth):
    case = tasks.niah(tokenizer, length, depth)
    assert abs(len(case.prompt_ids) - length) <= 0.01 * length
    (word,) = case.answers
    measured = context_depth(tokenizer, case, f"The secret password for the vault is {word}.")
    assert measured == pytest.approx(depth, abs=0.04)
    assert tokenizer.decode(case.prompt_ids).rstrip().endswith("assistant"), "the reply is left to the model"


def test_cases_are_reproducible_and_seeded(tokenizer):
    a, b = tasks.niah(tokenizer, 1000, 0.5), tasks.niah(tokenizer, 1000, 0.5)
    assert a == b and a.prompt_ids == b.prompt_ids
    assert tasks.niah(tokenizer, 1000, 0.5, seed=1).prompt_ids != a.prompt_ids


def test_multikey_and_spread_plant_every_fact(tokenizer):
    mk = tasks.multikey(tokenizer, 2000)
    text = tokenizer.decode(mk.prompt_ids)
    assert len(mk.distractors) == 3 and mk.answers[0] not in mk.distractors
    assert all(f" is {w}." in text for w in (*mk.answers, *mk.distractors))
    sp = tasks.spread(tokenizer, 2000)
    depths = [context_depth(tokenizer, sp, f"One of the secret passwords for the vault is {w}.") for w in sp.answers]
    assert len(depths) == 3 and abs(len(sp.prompt_ids) - 2000) <= 20
    for i, d in enumerate(sorted(depths)):  # one fact in each third of (10%, 90%)
        assert 0.1 + 0.8 * i / 3 - 0.03 <= d <= 0.1 + 0.8 * (i + 1) / 3 + 0.03


def test_build_counts_cases(tokenizer):
    cases = tasks.build(tokenizer, ("niah", "spread"), (1000,), (0.25, 0.75), range(2))
    assert [c.task for c in cases].count("niah") == 4 and [c.task for c in cases].count("spread") == 2
    assert len({c.name for c in cases}) == len(cases)


def case(answers, distractors=()):
    return tasks.Case("t", 100, None, 0, (), tuple(answers), tuple(distractors))


def test_score_is_exact_whole_word_match():
    c = case(["lighthouse"])
    assert tasks.score(c, "The secret password for the vault is Lighthouse.")
    assert not tasks.score(c, "The password is lighthouses.")
    assert not tasks.score(c, "The password is light house.")
    assert not tasks.score(case(["Fiona", "Gideon"]), "Fiona and Harriet")
    assert tasks.score(case(["Fiona", "Gideon"]), "Gideon, Fiona")
    assert not tasks.score(case(["lantern"], ["compass"]), "lantern or compass")


def test_answer_first_flags_replies_that_open_with_the_answer():
    c = case(["octopus"])
    assert tasks.answer_first(c, " Octopus. That is the password.")
    assert not tasks.answer_first(c, "The secret password is octopus.")
    assert not tasks.answer_first(c, "")


def test_plant_inserts_at_sentence_boundaries():
    context = "One two. Three four. Five six. Seven eight."
    out = haystack.plant(context, [(0.5, "NEEDLE."), (0.0, "FIRST."), (1.0, "LAST.")])
    assert out.startswith("FIRST. One two.") and out.endswith("eight. LAST.")
    assert "four. NEEDLE. Five" in out
