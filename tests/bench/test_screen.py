"""bench.screen: the batched cached decode, its keep masks and its flags (tiny random Llama, float32).
That the decode equals the engine's is tests/engine/test_reference_decode.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench import screen
from bench.needle_layers import ScoreCapture
from runtime.tiny_model import build

N = 60


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build(tmp_path_factory.mktemp("tiny") / "llama", layers=2)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(100, 1000, (N,), generator=torch.Generator().manual_seed(0)).tolist()


def masks(model, seed: int = 1) -> torch.Tensor:
    """Full KV and two random masks of [L, H_kv, N]."""
    shape = (2, model.config.num_key_value_heads, N)
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.ones(shape, dtype=torch.bool), torch.rand(shape, generator=g) < 0.3,
                        torch.rand(shape, generator=g) < 0.1])


def test_each_batch_row_decodes_as_its_mask_alone_and_as_one_whole_sequence(model, prompt):
    scores, cache, first = screen.prefill(model, ScoreCapture(8), prompt)
    assert len(scores) == 2 and scores[0].shape == (model.config.num_key_value_heads, N - 8)
    keep = masks(model)
    batch = screen.decode(model, cache, first, keep, steps=12)
    assert len(set(map(tuple, batch))) == 3, "the masks change the replies"
    for b, reply in enumerate(batch):
        assert screen.decode(model, cache, first, keep[b : b + 1], steps=12) == [reply]
        # the whole sequence at once (no cache) picks the same token at every step
        model.set_attn_implementation(screen.KeptRowsAttention(keep[b : b + 1]).name)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + reply[:-1]])).logits[0, N - 1 :]
        assert logits.argmax(dim=-1).tolist() == reply


def test_a_reply_ends_before_its_first_stop_token(model, prompt):
    _, cache, first = screen.prefill(model, ScoreCapture(8), prompt)
    keep = masks(model)[:1]
    (whole,) = screen.decode(model, cache, first, keep, steps=12)
    (cut,) = screen.decode(model, cache, first, keep, steps=12, stop={whole[5]})
    assert cut == whole[: whole.index(whole[5])]


def test_keep_masks_full_kv_keeps_all_and_a_budget_keeps_its_rows(model, prompt):
    scores, _, _ = screen.prefill(model, ScoreCapture(8), prompt)
    shape = (2, model.config.num_key_value_heads)
    configs = [("full", None), ("snapkv", 24), ("snapkv+adaptive", 24), ("snapkv", 100)]
    keep = screen.keep_masks(scores, N, configs, window=8, shape=shape)
    assert keep.shape == (4, *shape, N)
    assert bool(keep[0].all()) and bool(keep[3].all()), "full KV, and a budget above the prompt, keep every row"
    assert (keep[1].sum(dim=-1) == 24).all(), "uniform heads keep the budget each"
    assert (keep[2].sum(dim=(-1, -2)) == 24 * shape[1]).all(), "adaptive heads share the layer's rows"


@pytest.mark.parametrize("argv, flag", [(["--budgets", "8"], "--budgets"), (["--limit", "0"], "--limit"),
                                        (["--first-prompt", "-1"], "--first-prompt"),
                                        (["--adaptive-layers", "4"], "--adaptive-layers")])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        screen.parse(argv)
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_a_split_label_is_adaptive_in_its_layers_and_uniform_elsewhere(model, prompt):
    scores, _, _ = screen.prefill(model, ScoreCapture(8), prompt)
    shape = (2, model.config.num_key_value_heads)
    labels = screen.split_labels(["snapkv", "snapkv+adaptive"], layers=2, parts=2)
    assert labels == ["snapkv+adaptive[0-0]", "snapkv+adaptive[1-1]"]
    uniform, adaptive, first, second = screen.keep_masks(
        scores, N, [(x, 24) for x in ["snapkv", "snapkv+adaptive", *labels]], window=8, shape=shape)
    assert not torch.equal(uniform, adaptive), "this prompt's adaptive heads differ from uniform"
    assert torch.equal(first[0], adaptive[0]) and torch.equal(first[1], uniform[1])
    assert torch.equal(second[0], uniform[0]) and torch.equal(second[1], adaptive[1])
    assert screen.layer_groups(24, 4) == [(0, 5), (6, 11), (12, 17), (18, 23)]
    assert screen.split_labels(["snapkv", "snapkv+adaptive"], layers=2, parts=0) == [], "no split asked"


def test_kept_attention_is_the_share_of_full_kvs_reply_attention_on_kept_rows(model, prompt):
    _, cache, first = screen.prefill(model, ScoreCapture(8), prompt)
    keep = masks(model)
    record = [[] for _ in range(2)]
    replies = screen.decode(model, cache, first, keep, steps=12, record=record)
    assert [len(steps) for steps in record] == [11, 11], "one entry per decode step and layer"
    # what was recorded is full KV's attention: transformers' eager attention, at the query that fed the first token
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(torch.tensor([prompt + replies[0][:1]]), output_attentions=True).attentions
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, steps in enumerate(record):
        reference = eager[layer][0, :, N, :N].reshape(-1, g, N).sum(dim=1)
        assert torch.allclose(steps[0], reference, atol=1e-5)
    need = screen.reply_attention(record, len(replies[0]))
    share = screen.kept_attention(need, keep)
    assert share.shape == (3, 2)
    assert torch.allclose(share[0], torch.ones(2)), "full KV keeps all of its own attention"
    assert bool((share[1] > share[2]).all()), "a mask keeping 30% of rows keeps more than one keeping 10%"
    assert screen.reply_attention(record, 0) is None, "an empty reply reads nothing"
    first_step = screen.kept_attention(screen.reply_attention(record, 1), keep)
    assert not torch.allclose(first_step[1], share[1]), "every step of the reply counts"


def test_kept_answer_attention_weighs_the_answer_rows_by_the_attention_they_draw():
    need = torch.zeros(2, 2, 10)  # [L, H_kv, n]
    need[0, 0, 3], need[0, 1, 3], need[0, 0, 4] = 6.0, 1.0, 1.0  # layer 0: head 0 reads the answer rows most
    need[1] = 0.5
    keep = torch.zeros(3, 2, 2, 10, dtype=torch.bool)
    keep[0] = True  # full KV
    keep[1, 0, 0, 3] = True  # only head 0's row 3 in layer 0
    keep[2, 0, 1, 3] = keep[2, 0, 0, 4] = True  # the two rows read least
    whole, per_layer = screen.kept_answer_attention(need, keep, rows=[3, 4])
    assert torch.allclose(per_layer[:, 0], torch.tensor([1.0, 6 / 8, 2 / 8]))
    assert torch.allclose(per_layer[:, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(whole, torch.tensor([1.0, 6 / 10, 2 / 10])), "pooled over layers: layer 1's 2.0 counts"
    assert screen.attention_shares(None, keep, [3]) == [{}, {}, {}], "no reply, no shares"
    fields = screen.attention_shares(need, keep, [])[1]
    assert set(fields) == {"kept_attention", "kept_attention_per_layer"}, "no answer rows, no answer share"
