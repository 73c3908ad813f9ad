"""Per-request ``kv_policy`` / ``kv_budget`` in the fields SGLang's router forwards, and the kept
rows in OpenAI responses.

``sglang-router`` 0.3.2 re-serialises ``/generate`` and ``/v1/chat/completions`` bodies through its
own request types, which have no ``custom_params`` (it drops them, top level and in
``sampling_params``). It keeps ``custom_labels`` on ``/generate`` and ``metadata`` on chat (both
string maps) and passes ``/v1/completions`` bodies whole. Their ``kv_*`` entries become the
request's ``custom_params`` here, on the worker, checked with the same rules: a bad value is an
HTTP 400 naming the field it came in.
"""

from __future__ import annotations

from . import settings

_GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
_HANDLE = "sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase.handle_request"
_BUILDERS = (
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._build_chat_response",
    "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._build_completion_response",
)


def register(registry, hook_type) -> None:
    """Called from the plugin's ``register`` with SGLang's HookRegistry and HookType."""
    registry.register(_GENERATE, labels_into_custom_params, hook_type.BEFORE)
    registry.register(_HANDLE, metadata_into_custom_params, hook_type.AROUND)
    for target in _BUILDERS:
        registry.register(target, kept_rows_in_metadata, hook_type.AFTER)


def labels_into_custom_params(manager, obj, *args, **kwargs):
    """BEFORE ``TokenizerManager.generate_request``: move ``custom_labels``' ``kv_*`` entries into
    every sampling-params dict's ``custom_params`` (and out of the labels, which SGLang's metrics
    would take as label names)."""
    from ..policy.request import for_request, from_labels, merged

    labels = getattr(obj, "custom_labels", None)
    ours = from_labels(labels, "custom_labels")
    if not ours:
        return
    for_request(settings.current(), ours, "custom_labels")
    obj.custom_labels = {k: v for k, v in labels.items() if k not in ours} or None
    if obj.sampling_params is None:
        obj.sampling_params = {}
    for params in obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params]:
        params["custom_params"] = merged(params.get("custom_params"), ours, "custom_labels")


async def metadata_into_custom_params(original, serving, request, raw_request):
    """AROUND ``OpenAIServingBase.handle_request``: the body's ``metadata`` ``kv_*`` entries join
    ``request.custom_params`` (SGLang's pydantic request has no ``metadata``: read the raw body,
    which Starlette has cached)."""
    if raw_request is not None and hasattr(request, "custom_params"):
        from ..policy.request import for_request, from_labels, merged

        try:
            body = await raw_request.json()
            ours = from_labels(body.get("metadata") if isinstance(body, dict) else None, "metadata")
            if ours:
                for_request(settings.current(), ours, "metadata")
                request.custom_params = merged(request.custom_params, ours, "metadata")
        except ValueError as e:
            return serving.create_error_response(message=str(e), err_type="BadRequest", status_code=400)
    return await original(serving, request, raw_request)


def kept_rows_in_metadata(response, serving, request, ret, *args, **kwargs):
    """AFTER ``_build_chat_response`` / ``_build_completion_response``: ``metadata.kv_kept_per_layer``
    lists, per choice (in ``choices[i].index`` order), the rows each layer kept, or null where the
    request was not compressed."""
    metadata = getattr(response, "metadata", None)
    if metadata is None or not isinstance(ret, list):
        return response
    kept = [item.get("meta_info", {}).get("kv_kept_per_layer") for item in ret]
    if any(k is not None for k in kept):
        metadata["kv_kept_per_layer"] = kept
    return response
