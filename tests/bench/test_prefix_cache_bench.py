from bench.prefix_cache import markdown, summarize, workload


def test_workload_asks_each_document_several_questions():
    prompts = workload(docs=2, doc_tokens=50, turns=3, question_tokens=5)
    assert len(prompts) == 6 and all(len(p) == 55 for p in prompts)
    assert prompts[0][:50] == prompts[2][:50] != prompts[3][:50]
    assert prompts[0][50:] != prompts[1][50:], "new question each turn"


def _run(ttft, cached, out=(1, 2), kept=(4, 4)):
    return {"ttft": ttft, "cached_tokens": cached, "output_ids": list(out), "kept_per_layer": list(kept)}


def test_summary_compares_follow_up_questions_and_checks_agreement():
    on = [_run(2.0, 0), _run(0.5, 50), _run(0.3, 50)]
    off = [_run(2.0, 0), _run(2.1, 0), _run(1.9, 0)]
    s = summarize(on, off, turns=3)
    assert s["followup_ttft_cache_s"] == 0.4 and s["followup_ttft_no_cache_s"] == 2.0
    assert s["followup_speedup"] == 5.0 and s["followup_cached_tokens"] == 50
    assert s["same_tokens"] and s["same_kept_rows"] and s["compressed"]
    off[2] = _run(1.9, 0, out=(1, 3))
    on[1] = _run(0.5, 50, kept=(5, 3))
    s = summarize(on, off, turns=3)
    assert not s["same_tokens"] and not s["same_kept_rows"]
    text = markdown({"summary": s, "model": "m", "args": {"kv_budget": 8, "docs": 1, "doc_tokens": 50, "turns": 3,
                                                         "question_tokens": 5, "max_new_tokens": 2}})
    assert "5.0x" in text and "Same tokens on both servers: NO" in text
