"""Prometheus metrics in the text exposition format (0.0.4), without the prometheus_client dependency.

Counters and histograms are updated from the event loop and from generation threads, so every
update takes one lock; gauges (queue depth, in flight) are read from the engine at scrape time so
they can never drift from the truth.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

# Request latency spans 5 ms (a health check) to minutes (a long generation on a big model).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in items) + "}"


def _fmt_num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def quantile(self, q: float) -> float:
        """An upper-bound estimate (bucket edge) of the q-quantile; nan when empty."""
        if self.count == 0:
            return float("nan")
        target = q * self.count
        acc = 0
        for b, c in zip(self.buckets + (float("inf"),), self.counts):
            acc += c
            if acc >= target:
                return b
        return float("inf")


class Metrics:
    """The server's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, prefix: str = "tritlm"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self.requests: dict[Labels, int] = {}
        self.duration: dict[Labels, Histogram] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished: dict[Labels, int] = {}  # generations by finish reason (stop, length, cancelled, error)
        self.rejected = 0  # 503s from a full queue
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []

    def add_gauge(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self._gauges.append((name, help, fn))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (("endpoint", endpoint), ("status", str(status)))
            self.requests[key] = self.requests.get(key, 0) + 1
            dk = (("endpoint", endpoint),)
            h = self.duration.get(dk)
            if h is None:
                h = self.duration[dk] = Histogram(LATENCY_BUCKETS)
            h.observe(seconds)

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                           ttft_s: float | None) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            key = (("reason", finish_reason),)
            self.finished[key] = self.finished.get(key, 0) + 1
            if ttft_s is not None:
                self.ttft.observe(ttft_s)

    def observe_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self) -> str:
        p = self.prefix
        out: list[str] = []

        def head(name: str, kind: str, help: str) -> None:
            out.append(f"# HELP {p}_{name} {help}")
            out.append(f"# TYPE {p}_{name} {kind}")

        def hist(name: str, items: Iterable[tuple[Labels, Histogram]]) -> None:
            for labels, h in items:
                acc = 0
                for b, c in zip(h.buckets + (float("inf"),), h.counts):
                    acc += c
                    out.append(f"{p}_{name}_bucket{_fmt_labels(labels, ('le', _fmt_num(b)))} {acc}")
                out.append(f"{p}_{name}_sum{_fmt_labels(labels)} {_fmt_num(h.sum)}")
                out.append(f"{p}_{name}_count{_fmt_labels(labels)} {h.count}")

        with self._lock:
            head("requests_total", "counter", "HTTP requests by endpoint and status code.")
            for labels, n in sorted(self.requests.items()):
                out.append(f"{p}_requests_total{_fmt_labels(labels)} {n}")
            head("request_duration_seconds", "histogram",
                 "Request latency, until the last byte (streams included).")
            hist("request_duration_seconds", sorted(self.duration.items()))
            head("time_to_first_token_seconds", "histogram", "Admission to first generated token.")
            hist("time_to_first_token_seconds", [((), self.ttft)])
            head("prompt_tokens_total", "counter", "Prompt tokens of admitted generations.")
            out.append(f"{p}_prompt_tokens_total {self.prompt_tokens}")
            head("completion_tokens_total", "counter", "Tokens generated.")
            out.append(f"{p}_completion_tokens_total {self.completion_tokens}")
            head("generations_total", "counter", "Finished generations by finish reason.")
            for labels, n in sorted(self.finished.items()):
                out.append(f"{p}_generations_total{_fmt_labels(labels)} {n}")
            head("rejected_total", "counter", "Requests refused with 503 because the queue was full.")
            out.append(f"{p}_rejected_total {self.rejected}")
        for name, help, fn in self._gauges:
            head(name, "gauge", help)
            out.append(f"{p}_{name} {_fmt_num(float(fn()))}")
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` from exposition text (for tests and the benchmark)."""
    vals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, v = line.rpartition(" ")
        vals[key] = float(v)
    return vals


class MetricsMiddleware:
    """Counts requests by endpoint and status and times them until their last byte (streams too).

    A plain ASGI middleware, not ``BaseHTTPMiddleware``, which would buffer streaming bodies and
    interfere with disconnect detection.
    """

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/")
                                                   else "other")
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - t0)
