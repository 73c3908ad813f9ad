"""The SGLang plugin (entry point ``sglang.srt.plugins: dkv``), run in every SGLang process.

With ``--kv-policy full`` (the default) it only adds the ``dkv`` stats and counters, checks
requests (``kv_*`` custom params, empty prompts) and carries our meta_info keys: serving is
vanilla SGLang. With a compressing policy it swaps in the dkv pool and allocator, the dkv
attention backends, prefill plans, re-opened admission and the compression step after each
prefill batch (ordered before the next batch under overlap scheduling: ``overlap.py``).
"""

from __future__ import annotations

import logging

import torch

from . import overlap, routed_params, settings

logger = logging.getLogger(__name__)

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_PREFILL_RESULT = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_prefill"
)
_VERIFY = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
_BATCH = "sglang.srt.managers.schedule_batch.ScheduleBatch"
_ADMIT = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"
_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
_VALIDATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
_REQUEST_LEVEL = (
    "sglang.srt.managers.scheduler_components.output_streamer."
    "SchedulerOutputStreamer.is_request_level_customized_info_key"
)
_MAX_PREFIX = "sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len"
_ADDER = "sglang.srt.managers.schedule_policy.PrefillAdder"
_STREAM_CHUNK = (
    "sglang.srt.managers.scheduler_components.output_streamer._GenerationStreamAccumulator.accept"
)
_FORWARD_BATCH = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
_FREE_SLOTS = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows"
_INTERNAL_STATE = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import sglang_cli

    sglang_cli.register()  # --kv-* flags on SGLang's own commands
    config = settings.current()
    HookRegistry.register(_INTERNAL_STATE, _with_dkv_stats, HookType.AROUND)
    HookRegistry.register(_VERIFY, _verify_kv_params, HookType.AFTER)
    HookRegistry.register(_VALIDATE, _refuse_empty_prompt, HookType.BEFORE)
    HookRegistry.register(f"{_BATCH}.prepare_for_decode", _count_running, HookType.AFTER)
    HookRegistry.register(f"{_BATCH}.retract_decode", _count_retracted, HookType.AFTER)
    # The meta_info keys are carried whatever this process's policy: an in-process Engine's
    # tokenizer side loads plugins once, possibly under an earlier engine's settings.
    HookRegistry.register(_REQUEST_LEVEL, _meta_keys_are_request_level, HookType.AROUND)
    HookRegistry.register(_META, _put_meta_keys, HookType.AROUND)
    HookRegistry.register(_STREAM_CHUNK, _meta_keys_at_stream_end, HookType.AROUND)
    routed_params.register(HookRegistry, HookType)  # kv_* in the fields SGLang's router forwards
    if not config.compresses:
        return
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    HookRegistry.register(f"{_CONFIGURATOR}._build_mha_kv_pool", _build_pool, HookType.AROUND)
    HookRegistry.register(f"{_CONFIGURATOR}._build_token_to_kv_pool_allocator", _build_allocator, HookType.AROUND)
    HookRegistry.register(f"{_BATCH}.prepare_for_extend", _plan_prefill, HookType.AFTER)
    HookRegistry.register(_ADMIT, _reopen_admission, HookType.BEFORE)
    HookRegistry.register(_PREFILL_RESULT, _compress_after_prefill, HookType.AROUND)
    overlap.register(HookRegistry, HookType)  # a cutting prefill's result before the next batch
    HookRegistry.register(_MAX_PREFIX, _leave_the_window_to_prefill, HookType.AFTER)
    HookRegistry.register(f"{_ADDER}._select_prefill_admission", _first_chunk_leaves_the_window, HookType.AFTER)
    HookRegistry.register(f"{_ADDER}.floor_chunked_tokens", _next_chunk_leaves_the_window, HookType.AFTER)
    if settings.page_size() > 1:  # physical pages of rows: placed once the ids meet their requests
        HookRegistry.register(f"{_BATCH}.prepare_for_extend", _place_extend, HookType.AFTER)
        HookRegistry.register(f"{_BATCH}.prepare_for_decode", _place_decode, HookType.AFTER)
    HookRegistry.register(f"{_BATCH}.prepare_for_decode", _index_decode, HookType.AFTER)  # after placing
    HookRegistry.register(_FORWARD_BATCH, _decode_slots_on_host, HookType.AFTER)
    HookRegistry.register(_FREE_SLOTS, _free_kept_entries, HookType.AFTER)
    ATTENTION_BACKENDS["torch_native"] = _create_torch_backend
    from ..attention.flashinfer_backend import register_gpu_backend  # on CUDA: FlashInfer over the dkv pool

    register_gpu_backend(config)
    logger.info("dkv-sglang: %s", config)


def _create_torch_backend(model_runner):
    from ..attention.torch_backend import DkvTorchAttnBackend

    return DkvTorchAttnBackend(model_runner, settings.current())


def _build_pool(original, configurator, *, max_total_num_tokens, mha_pool_class, quant_method=None):
    from ..memory.pool import DkvKVPool

    if quant_method is not None:
        raise NotImplementedError("dkv-sglang does not support quantized KV caches yet")
    from sglang.srt.mem_cache import kv_cache_configurator as kcc

    par = kcc.get_parallel()
    return DkvKVPool(
        max_total_num_tokens,
        page_size=configurator.pool_page_size,
        row_page_size=settings.page_size(),
        dtype=configurator.kv_cache_dtype,
        head_num=configurator.model_config.get_num_kv_heads(par.attn_tp_size, par.attn_dcp_size),
        head_dim=configurator.model_config.head_dim,
        v_head_dim=configurator.model_config.v_head_dim,
        layer_num=configurator.layer_info.num_effective_layers,
        device=configurator.device,
        start_layer=configurator.layer_info.start_layer,
        end_layer=configurator.layer_info.end_layer,
    )


def _build_allocator(original, configurator, *, sizes, token_to_kv_pool, **kwargs):
    from ..memory.pool import DkvAllocator, DkvKVPool

    if not isinstance(token_to_kv_pool, DkvKVPool):
        return original(configurator, sizes=sizes, token_to_kv_pool=token_to_kv_pool, **kwargs)
    return DkvAllocator(
        sizes.max_total_num_tokens,
        dtype=configurator.kv_cache_dtype,
        device=configurator.device,
        kvcache=token_to_kv_pool,
        need_sort=False,
    )


def _plan_prefill(result, batch):
    from .compressor import plan_batch

    plan_batch(batch, settings.current())


def _place_extend(result, batch):
    from .paging import place_extend

    place_extend(batch)


def _index_decode(result, batch):
    from .compressor import index_decode

    index_decode(batch)


def _decode_slots_on_host(result, *args, **kwargs):
    """SGLang hands a decode ForwardBatch its host-side lengths (``seq_lens_cpu``) but not its
    host-side request slots; the scheduler batch keeps both. With them a decode step's page
    tables are built without reading anything back from the device."""
    if result is None or getattr(result, "req_pool_indices_cpu", None) is not None:
        return
    for arg in (*args, *kwargs.values()):
        slots = getattr(arg, "req_pool_indices_cpu", None)
        if isinstance(slots, torch.Tensor) and slots.numel() == result.batch_size:
            result.req_pool_indices_cpu = slots
            return


def _free_kept_entries(result, req_to_token_pool, indices, *args, **kwargs):
    """A finished or retracted request's slot is free: so is its kept-row entry."""
    from ..memory.kept_index import slots_freed

    slots_freed(req_to_token_pool, indices)


def _place_decode(result, batch):
    from .paging import place_decode

    place_decode(batch)


def _meta_keys_are_request_level(original, streamer, key):
    from .compressor import META_KEYS

    return key in META_KEYS or original(streamer, key)


def _meta_keys_at_stream_end(original, accumulator, *args, **kwargs):
    """SGLang sends a stream's request-level keys with its first chunk only, which leaves
    before the policy has chosen: send ours with the stream's last chunk too."""
    req = kwargs["req"] if "req" in kwargs else args[0]
    before = len(accumulator.rids)
    original(accumulator, *args, **kwargs)
    if not (req.stream and req.finished() and req.customized_info and len(accumulator.rids) > before):
        return
    from .compressor import META_KEYS

    for key in META_KEYS:
        value = req.customized_info.get(key)
        if value is None:
            continue
        per_request = accumulator.customized_info.setdefault(key, [[] for _ in accumulator.rids[:-1]])
        if len(per_request) < len(accumulator.rids):
            per_request.append(value)
        else:
            per_request[-1] = value


def _put_meta_keys(original, manager, meta_info, state, customized_info, index, *args, **kwargs):
    """Our keys go into meta_info as they are (SGLang's default concatenates token lists)."""
    from .compressor import META_KEYS

    rest = {}
    for key, values in customized_info.items():
        if key not in META_KEYS:
            rest[key] = values
        elif values[index] not in (None, []):
            meta_info[key] = values[index]
    if rest:
        original(manager, meta_info, state, rest, index, *args, **kwargs)


def _reopen_admission(scheduler, running_batch, *args, **kwargs):
    """Rows freed by compression count like a request leaving: admission looks again."""
    allocator = scheduler.token_to_kv_pool_allocator
    if getattr(allocator, "freed_since_admission", False):
        allocator.freed_since_admission = False
        running_batch.batch_is_full = False


def _count_running(result, batch):
    from .metrics import record_pool
    from .stats import COUNTERS

    COUNTERS.peak_running = max(COUNTERS.peak_running, len(batch.reqs))
    if hasattr(batch.token_to_kv_pool_allocator, "table"):
        record_pool(batch.token_to_kv_pool_allocator)


def _count_retracted(result, batch):
    from .stats import COUNTERS

    COUNTERS.retracted += len(result[0])
    return result


def _compress_after_prefill(original, processor, batch, result):
    from .compressor import compress_batch

    out = original(processor, batch, result)
    compress_batch(batch, settings.current(), processor.tree_cache, processor.token_to_kv_pool_allocator)
    return out


def _leave_the_window_to_prefill(max_prefix_len, req, input_len):
    """How much of a compressing request may come from SGLang's prefix cache.

    The policy scores the prompt with the queries of its last ``window`` tokens, so those are
    always prefilled: a cache hit then chooses exactly the rows a miss would. A retracted
    request's generated tokens are always prefilled again (they attend only to the rows it
    kept, which no cached entry was computed with).
    """
    from ..policy.request import for_request
    from .compressor import REPLAY_ATTR

    config = for_request(settings.current(), req.sampling_params.custom_params)
    prompt_len = len(req.origin_input_ids)
    if not config.compresses or prompt_len <= config.budget:
        return max_prefix_len
    if getattr(req, REPLAY_ATTR, None) is not None:
        return min(max_prefix_len, prompt_len)
    return max(0, min(max_prefix_len, prompt_len - config.window))


def _whole_window_cut(cut: int, remaining: int) -> int:
    """A chunk of ``cut`` of the ``remaining`` tokens, shortened so that the last chunk holds the
    whole observation window (its queries score the prompt, and a chunk sees only its own)."""
    window = settings.current().window
    if cut < remaining < cut + window and remaining > window:
        return remaining - window
    return cut


def _first_chunk_leaves_the_window(admission, adder, req, **kwargs):
    if getattr(admission, "is_chunked", False):  # (else an AddReqResult, or not cut)
        from dataclasses import replace

        remaining = len(req.full_untruncated_fill_ids) - admission.prefix_len
        cut = _whole_window_cut(admission.extend_len, remaining)
        if cut != admission.extend_len:
            return replace(admission, extend_len=cut)
    return admission


def _next_chunk_leaves_the_window(cut, adder, trunc_len, remaining):
    return _whole_window_cut(cut, remaining)


def _verify_kv_params(result, sampling_params, *args, **kwargs):
    """Refuse a request whose ``custom_params`` ask for a policy this server cannot run
    (a ValueError here is SGLang's HTTP 400 with the message)."""
    from ..policy.request import for_request

    for_request(settings.current(), sampling_params.custom_params)


def _refuse_empty_prompt(manager, obj, input_ids, *args, **kwargs):
    """An empty prompt would reach the model as a zero-token batch and crash the scheduler
    (SGLang 0.5.23, CPU path): refuse it as a bad request instead."""
    if input_ids is not None and len(input_ids) == 0 and getattr(obj, "input_embeds", None) is None:
        raise ValueError("the prompt is empty: send text or input_ids with at least one token")


def _with_dkv_stats(original, controller, recv_req):
    from .stats import dkv_stats

    out = original(controller, recv_req)
    out.internal_state["dkv"] = dkv_stats(controller.scheduler, settings.current())
    return out
