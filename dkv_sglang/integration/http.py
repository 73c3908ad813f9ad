"""``GET /dkv/stats`` on SGLang's HTTP server."""

from __future__ import annotations


def add_routes() -> None:
    from sglang.srt.entrypoints import http_server

    async def dkv_stats():
        from ..stats import combine

        states = await http_server.get_global_state().tokenizer_manager.get_internal_state()
        return combine([state["dkv"] for state in states])  # one per data-parallel rank

    if not any(getattr(r, "path", None) == "/dkv/stats" for r in http_server.app.routes):
        http_server.app.add_api_route("/dkv/stats", dkv_stats, methods=["GET"])
