"""``python -m dkv_sglang.stats URL...``: the ``/dkv/stats`` of several dkv servers, side by side
and summed, for an operator.

    python -m dkv_sglang.stats http://127.0.0.1:30001 http://127.0.0.1:30002
    python -m dkv_sglang.stats http://127.0.0.1:30000          # a router: asks it for its workers
    python -m dkv_sglang.stats --json URL...

A URL that has no ``/dkv/stats`` but answers SGLang router's ``GET /workers`` stands for the workers
it lists. A worker that does not answer is listed as down; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import requests

SUMMED = ("running_requests", "requests_compressed", "retracted_requests",
          "pool_rows_total", "pool_rows_free", "pool_rows_cached")
TIMEOUT = 10


def combine(ranks: list[dict]) -> dict:
    """One server's stats from its data-parallel schedulers' (``--dp-size N``): counts and rows
    summed, ``peak_running_requests`` the largest batch any one ran, ``recent`` concatenated, each
    rank's own figures under ``dp_ranks``."""
    if len(ranks) == 1:
        return ranks[0]
    out = {k: v for k, v in ranks[0].items() if k != "recent"}
    for key in (*SUMMED, "token_ids_free", "kept_index_entries"):
        if key in out:
            out[key] = sum(r[key] for r in ranks)
    out["peak_running_requests"] = max(r["peak_running_requests"] for r in ranks)
    out["recent"] = [entry for r in ranks for entry in r["recent"]]
    out["dp_ranks"] = [{k: v for k, v in r.items() if k != "recent"} for r in ranks]
    return out


def worker_urls(url: str) -> list[str]:
    """``url`` itself if it serves ``/dkv/stats``, else the workers of the router at ``url``."""
    url = url.rstrip("/")
    try:
        if requests.get(url + "/dkv/stats", timeout=TIMEOUT).status_code == 200:
            return [url]
        listed = requests.get(url + "/workers", timeout=TIMEOUT).json()["workers"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return [url]  # reported as down by fetch()
    return [w["url"].rstrip("/") for w in listed]


def fetch(url: str) -> dict | None:
    try:
        r = requests.get(url + "/dkv/stats", timeout=TIMEOUT)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def summary(per_worker: dict[str, dict | None]) -> dict:
    """Per-worker figures and their sums; ``kept_rows_per_request`` is the mean over the
    compressed requests in the workers' ``recent`` windows (all layers)."""
    up = {u: s for u, s in per_worker.items() if s is not None}
    total = {key: sum(s.get(key, 0) for s in up.values()) for key in SUMMED}
    total["peak_running_requests"] = max((s.get("peak_running_requests", 0) for s in up.values()), default=0)
    total["pool_rows_used"] = total["pool_rows_total"] - total["pool_rows_free"] - total["pool_rows_cached"]
    recent = [r for s in up.values() for r in s.get("recent", [])]
    kept = [sum(r["kept_per_layer"]) for r in recent]
    prompt = [r["prompt_tokens"] * len(r["kept_per_layer"]) for r in recent]
    total["kept_rows_per_request"] = round(sum(kept) / len(kept), 1) if kept else None
    total["retention"] = round(sum(kept) / sum(prompt), 4) if prompt else None
    return {"workers": {u: _row(s) for u, s in per_worker.items()}, "total": total,
            "workers_up": len(up), "workers_down": len(per_worker) - len(up)}


def _row(stats: dict | None) -> dict | None:
    if stats is None:
        return None
    row = {k: stats.get(k) for k in ("policy", "budget", "peak_running_requests", *SUMMED)}
    row["pool_rows_used"] = stats["pool_rows_total"] - stats["pool_rows_free"] - stats.get("pool_rows_cached", 0)
    return row


def render(view: dict) -> str:
    cols = ("policy", "budget", "running_requests", "peak_running_requests", "requests_compressed",
            "retracted_requests", "pool_rows_used", "pool_rows_cached", "pool_rows_total")
    heads = ("worker", "policy", "budget", "running", "peak", "compressed", "retracted", "rows used",
             "rows cached", "rows total")
    lines = [heads]
    for url, row in view["workers"].items():
        lines.append((url, "DOWN") + ("",) * (len(cols) - 1) if row is None else (url, *(str(row[c]) for c in cols)))
    t = view["total"]
    lines.append((f"total ({view['workers_up']} up)", "", "", *(str(t[c]) for c in cols[2:])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(heads))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    if t["kept_rows_per_request"] is not None:
        out.append(f"recent compressed requests: {t['kept_rows_per_request']} rows kept each (all layers), "
                   f"retention {t['retention']:.2%} of their prompts' rows")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dkv_sglang.stats", description=__doc__.split("\n\n")[0])
    ap.add_argument("urls", nargs="+", help="dkv servers, or an SGLang router in front of them")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    urls = list(dict.fromkeys(w for u in args.urls for w in worker_urls(u)))
    view = summary({u: fetch(u) for u in urls})
    print(json.dumps(view, indent=1) if args.json else render(view))
    return 1 if view["workers_down"] else 0


if __name__ == "__main__":
    sys.exit(main())
