"""The quality benchmark's newer tasks: follow-up, aggregation (cwe), code (LCC), continuation."""

from __future__ import annotations

import pytest

from bench import codeio, haystack, tasks


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from runtime.prepare_model import prepare

    return AutoTokenizer.from_pretrained(prepare("smollm2"))


def test_followup_document_is_a_prefix_of_the_question_turn(tokenizer):
    case = tasks.followup(tokenizer, 1000, 0.5)
    assert abs(len(case.prompt_ids) - 1000) <= 10
    # the document request's tokens up to its generation prompt open the follow-up prompt
    text, warm = tokenizer.decode(case.prompt_ids), tokenizer.decode(case.warm_ids)
    doc_turn = warm[:warm.rindex("<|im_start|>assistant")]
    assert text.startswith(doc_turn)
    assert f"vault is {case.answers[0]}." in doc_turn
    assert text.rstrip().endswith("assistant") and "secret password" in text[len(doc_turn):]


def test_cwe_common_words_are_the_most_frequent(tokenizer):
    case = tasks.cwe(tokenizer, 1000, seed=3)
    assert 900 <= len(case.prompt_ids) <= 1000
    text = tokenizer.decode(case.prompt_ids)
    items = [line.split(". ", 1)[1] for line in text.splitlines() if line[:1].isdigit() and ". " in line]
    counts = {w: items.count(w) for w in set(items)}
    top = sorted(counts, key=counts.get, reverse=True)[:3]
    assert set(top) == set(case.answers)
    assert min(counts[w] for w in case.answers) > max(c for w, c in counts.items() if w not in case.answers)
    assert tasks.graded(case, f"The words are {case.answers[0]} and {case.answers[2]}.") == pytest.approx(2 / 3)
    assert tasks.cwe(tokenizer, 1000, seed=3) == case


def test_code_case_cuts_a_real_file_before_a_code_line(tokenizer):
    case = tasks.code(tokenizer, 1000, seed=1)
    (line,) = case.answers
    assert codeio.nontrivial(line)
    prefix = tokenizer.decode(case.prompt_ids)
    assert prefix.startswith("Please complete the code given below.")
    source = next(p.read_text(errors="replace") for p in codeio.source_files()
                  if prefix.split("\n", 1)[1][:2000] in p.read_text(errors="replace"))
    body = prefix.split("\n", 1)[1]
    assert source[source.index(body) + len(body):].lstrip(" ").startswith(line)
    assert abs(len(case.prompt_ids) - 1000) < 200


def test_code_lines_skip_docstrings_and_comments():
    src = ('def f(x):\n    """Doc.\n    if looks_like_code(x) == 1:\n    """\n'
           "    # comment here is long\n    return x + 1\n")
    assert codeio.code_lines(src) == {0, 5}
    assert codeio.cut(src, 0) == ("".join(src.splitlines(True)[:5]), "return x + 1")
    assert codeio.cut(src, len(src) - 2) is None


@pytest.mark.parametrize("pred,target,want", [
    ("return x", "return x", 1.0),
    ("abc", "xyz", 0.0),
    ("kitten", "sitting", 2 * 4 / 13),  # LCS "ittn"
    ("", "", 1.0),
])
def test_edit_similarity(pred, target, want):
    assert codeio.edit_similarity(pred, target) == pytest.approx(want)


def test_edit_similarity_matches_rapidfuzz():
    fuzz = pytest.importorskip("rapidfuzz.fuzz")
    for a, b in [("self.x = foo(bar)", "self.y = foo(baz, 1)"), ("import numpy as np", "import torch")]:
        assert codeio.edit_similarity(a, b) == pytest.approx(fuzz.ratio(a, b) / 100)


def test_first_code_line_skips_blank_comments_and_fences():
    assert codeio.first_code_line("\n# note\n```python\n  x = 1\ny = 2") == "x = 1"
    assert codeio.first_code_line("\n\n") == ""


def test_agreement_and_first_divergence():
    assert tasks.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, 4)
    assert tasks.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == (0.75, 2)
    assert tasks.agreement([1, 2], [1, 2, 3, 4]) == (0.5, 2)  # a short reply disagrees where it stops


def test_continuation_is_raw_essay_text_of_exact_length(tokenizer):
    case = tasks.continuation(tokenizer, 800, seed=2)
    assert len(case.prompt_ids) == 800 and "<|im_start|>" not in tokenizer.decode(case.prompt_ids)
    assert tasks.continuation(tokenizer, 800, seed=2) == case != tasks.continuation(tokenizer, 800, seed=3)


def test_vocabulary_is_real_lowercase_essay_words():
    vocab = haystack.vocabulary()
    assert len(vocab) > 1000 and vocab == sorted(vocab)
    assert all(w.isalpha() and w.islower() and 6 <= len(w) <= 10 for w in vocab)
    assert "startup" in vocab
