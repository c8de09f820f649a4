"""A lean load generator for streaming completions: aiohttp, one JSON parse per server-sent event.

The client of ``bench_serve.py --sweep`` by default (``--client aiohttp``). The load generator
runs on the same 2 cores as the server it measures, so what it costs per token is taken from the
server: the openai client (``--client openai``) spent ~0.36 ms of CPU per streamed token here
(pydantic models per event), 13% of a core at 8 clients of the 700M model, against ~0.08 ms for
this one. Both servers of a sweep are driven by the same client.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


async def _stream(session, url: str, body: dict) -> tuple[float | None, int]:
    """One streaming completion: (seconds to the first event with a choice, or None; tokens)."""
    t0 = time.perf_counter()
    first, chunks, used = None, 0, None
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            choices = ev.get("choices") or []
            if choices and first is None:
                first = time.perf_counter() - t0
            if choices and choices[0].get("text"):
                chunks += 1
            if ev.get("usage"):
                used = ev["usage"].get("completion_tokens")
    return first, used if used is not None else chunks


async def run_stream_load(url: str, clients: int, per_client: int, max_tokens: int, timeout: float,
                          prompt: Callable[[int], str], body: dict | None = None) -> dict:
    """``clients`` concurrent streams, ``per_client`` requests each, one after another; the same
    result keys as ``bench_serve.run_load``."""
    import aiohttp

    lat: list[float] = []
    ttft: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def worker(session, c: int) -> None:
        nonlocal tokens
        for k in range(per_client):
            i = c * per_client + k
            t0 = time.perf_counter()
            try:
                first, n = await _stream(session, url, {
                    "model": "bench", "prompt": prompt(i), "max_tokens": max_tokens, "stream": True, "seed": i,
                    "stream_options": {"include_usage": True}, **(body or {})})
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{type(e).__name__}: {e}")
                continue
            tokens += n
            if first is not None:
                ttft.append(first)
            lat.append(time.perf_counter() - t0)

    # a connection per request: llama-server closes idle keep-alive connections, and a request
    # written to one it had closed failed ("Can not write request body"); a loopback connect is
    # ~0.1 ms of the time to first token, alike for both servers
    conn = aiohttp.TCPConnector(limit=clients, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(session, c) for c in range(clients))),
                               timeout * per_client + 30)
        wall = time.perf_counter() - t0
    return summary(clients * per_client, lat, ttft, errors, tokens, wall)


def summary(n: int, lat: list[float], ttft: list[float], errors: list[str], tokens: int, wall: float) -> dict:
    """The result of one load run (latencies and times to first token in seconds)."""
    return {"n": n, "ok": len(lat), "errors": errors, "wall_s": wall,
            "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "mean": statistics.fmean(lat) if lat else 0,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "tokens": tokens,
            "req_s": len(lat) / wall, "tok_s": tokens / wall}
