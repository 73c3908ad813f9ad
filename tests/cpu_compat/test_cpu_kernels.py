import sys

import pytest
import torch

from runtime import cpu_kernels


def test_assign_req_to_token_pool_matches_reference():
    torch.manual_seed(0)
    req_to_token = torch.zeros(6, 20, dtype=torch.int32)
    rows = torch.tensor([4, 1, 3])
    start = torch.tensor([0, 5, 2])
    end = torch.tensor([3, 9, 2])  # last request adds nothing
    loc = torch.arange(100, 107)
    expected = req_to_token.clone()
    offset = 0
    for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist()):
        for j in range(s, e):
            expected[r, j] = loc[offset]
            offset += 1
    cpu_kernels.assign_req_to_token_pool_cpu(rows, req_to_token, start, end, loc, 20)
    assert torch.equal(req_to_token, expected)


def test_copy_all_layer_kv_cache_matches_reference():
    torch.manual_seed(0)
    bufs = [torch.randn(12, 3, 4), torch.randn(12, 2, 8, dtype=torch.float64)]
    expected = [b.clone() for b in bufs]
    tgt = torch.tensor([0, 5, 7])
    src = torch.tensor([5, 2, 11])  # row 5 is read before it is overwritten
    for e in expected:
        e[tgt] = e[src].clone()
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs], dtype=torch.int64)
    cpu_kernels.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for b, e in zip(bufs, expected):
        assert torch.equal(b, e)


def test_install_only_when_the_real_module_is_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, "sgl_kernel", raising=False)
    monkeypatch.setattr(cpu_kernels, "real_sgl_kernel_available", lambda: True)
    assert cpu_kernels.install() is False and "sgl_kernel" not in sys.modules
    monkeypatch.setattr(cpu_kernels, "real_sgl_kernel_available", lambda: False)
    assert cpu_kernels.install() is True
    mod = sys.modules["sgl_kernel"]
    assert mod.assign_req_to_token_pool_cpu is cpu_kernels.assign_req_to_token_pool_cpu
    with pytest.raises(NotImplementedError, match="speculative"):
        mod.verify_tree_greedy_cpu()
