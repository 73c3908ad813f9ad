"""Pure-torch stand-ins for the ``sgl_kernel`` CPU ops SGLang 0.5.23 imports on its CPU path.

The registry's ``sglang-kernel`` wheels are CUDA builds: on a machine without CUDA,
``import sgl_kernel`` fails, and SGLang's CPU path imports two ops from it at module level
(``assign_req_to_token_pool_cpu``, ``copy_all_layer_kv_cache_cpu``) plus six speculative
decoding ops. :func:`install` puts a small ``sgl_kernel`` module into ``sys.modules`` holding
straightforward torch versions of the first two and, for the six others, functions that
raise ``NotImplementedError`` (speculative decoding is not supported on this path).

It only acts when the real module cannot be imported. It must run before SGLang is imported
in *every* process, spawned workers included, so set-up writes a ``.pth`` file that imports
:mod:`runtime.cpu_boot` at interpreter start.
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import torch

_SPECULATIVE_OPS = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "verify_tree_greedy_cpu",
)


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = next (end[i]-start[i]) of out_cache_loc``.

    ``out_cache_loc`` holds the requests' slots back to back, in batch order.
    """
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n > 0:
            req_to_token[row, s:e] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every buffer ``b`` (a raw address with a row stride in bytes): row ``tgt[i]`` := row ``src[i]``.

    Rows are copied as bytes; all sources are read before any target is written, as the
    kernel's gather-then-scatter does.
    """
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.to(torch.int64).numpy()
    src = src_loc.to(torch.int64).numpy()
    nrows = int(max(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        buf = (ctypes.c_uint8 * (nrows * stride)).from_address(ptr)
        rows = np.frombuffer(buf, dtype=np.uint8).reshape(nrows, stride)
        rows[tgt] = rows[src].copy()


def _unsupported(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available on this CPU machine "
            "(speculative decoding is not supported by dkv-sglang's CPU path)"
        )

    op.__name__ = name
    return op


def real_sgl_kernel_available() -> bool:
    try:
        import sgl_kernel  # noqa: F401
    except Exception:  # noqa: BLE001  (the CUDA build fails in several ways without CUDA)
        sys.modules.pop("sgl_kernel", None)
        return False
    return True


def install() -> bool:
    """Install the stand-in module if the real ``sgl_kernel`` is missing; True if installed."""
    existing = sys.modules.get("sgl_kernel")
    if existing is not None and getattr(existing, "__dkv_standin__", False):
        return True
    if real_sgl_kernel_available():
        return False
    mod = types.ModuleType("sgl_kernel")
    mod.__dkv_standin__ = True
    mod.__doc__ = "dkv-sglang pure-torch stand-in for sgl_kernel's CPU ops"
    mod.assign_req_to_token_pool_cpu = assign_req_to_token_pool_cpu
    mod.copy_all_layer_kv_cache_cpu = copy_all_layer_kv_cache_cpu
    for name in _SPECULATIVE_OPS:
        setattr(mod, name, _unsupported(name))
    sys.modules["sgl_kernel"] = mod
    return True
