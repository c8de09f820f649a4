"""Load test of ``tritlm serve``: N concurrent OpenAI clients, a fixed number of requests.

Starts ``tritlm serve`` as a subprocess on a free loopback port (so clients and server do not share
a GIL), drives it with ``openai.AsyncOpenAI`` clients, and prints latency percentiles, throughput
and errors, once per ``--max-batch`` setting. Every loop is bounded in count and time.

    .venv/bin/python benchmarks/bench_serve.py                 # trains the tiny FP model first
    .venv/bin/python benchmarks/bench_serve.py --preset 125M --max-batch 1,8 --max-tokens 32   # packed, batched
    .venv/bin/python benchmarks/bench_serve.py --model runs/demo --max-batch 1,8 --write

``--sweep 1,2,4,8,16`` instead measures one server at each count of concurrent streaming clients
(aggregate generated tok/s, p50 / p95 time to first token), and, with ``--llama-server``, llama.cpp's
own ``llama-server --parallel 8`` (continuous batching) on the same weights exported as TQ2_0 GGUF,
driven by the same client, interleaved with ours. The sweep's client is ``stream_load.py``
(aiohttp) unless ``--client openai``: the load generator shares the 2 cores with the server.

    bash benchmarks/build_llama_tools.sh          # once: llama-server, llama-bench, llama-perplexity
    .venv/bin/python benchmarks/bench_serve.py --preset 700M --sweep 1,2,4,8,16 --max-tokens 32 \
        --llama-server auto --threads 2 --write

``--write`` appends a dated section to ``benchmarks/RESULTS-serve.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stream_load import run_stream_load, summary

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--fp", "--preset", "tiny", "--max-steps", "30", "--threads", "1", "--quiet", "--set", "model.dim=32", "--set",
        "model.n_layers=1", "--set", "model.ffn_dim=64", "--set", "eval_batches=2", "--set", "tensorboard=false"]


# Letters only: the tiny model's character vocabulary (Tiny Shakespeare) has no digits but 3.
NAMES = ["ROMEO", "JULIET", "KING", "QUEEN", "HAMLET", "MERCUTIO", "TYBALT", "NURSE"]


def prompt(i: int) -> str:
    return f"{NAMES[i % len(NAMES)]}:\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_queue: int, threads: int | None, kv_dtype: str = "auto"
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server process
        env["TRITLM_NUM_THREADS"] = str(threads)  # the packed kernels' threads
    cmd = [sys.executable, "-m", "tritlm", "serve", model, "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), "--model-name", "bench", "--kv-dtype", kv_dtype]
    return _wait_healthy(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                         port)


def start_llama_server(binary: str, gguf: str, parallel: int, threads: int, ctx_per_slot: int,
                       kv_dtype: str = "f16") -> tuple[subprocess.Popen, str]:
    """llama.cpp's own server with continuous batching over ``parallel`` slots; ``kv_dtype`` q8
    gives it the q8_0 cache for keys and values (which needs its flash attention on)."""
    port = free_port()
    cmd = [binary, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "--parallel", str(parallel),
           "--cont-batching", "-t", str(threads), "-tb", str(threads), "-c", str(ctx_per_slot * parallel),
           "--no-webui", "-a", "bench"]
    if kv_dtype == "q8":
        cmd += ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return _wait_healthy(proc, port, timeout=180)


def find_llama_server(arg: str) -> str | None:
    """``auto``: the binary of benchmarks/build_llama_tools.sh, which builds it first when it is
    not there yet (about 10 minutes on 2 cores); None if that build fails."""
    if arg != "auto":
        return arg
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_llama_tools.sh")], capture_output=True, text=True)
    b = Path(r.stdout.strip().splitlines()[-1]) / "llama-server" if r.returncode == 0 and r.stdout.strip() else None
    return str(b) if b is not None and b.exists() else None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become healthy within {timeout:.0f} s")


async def run_load(url: str, clients: int, per_client: int, max_tokens: int, stream: bool,
                   timeout: float, chat_every: int = 2, body: dict | None = None) -> dict:
    from openai import AsyncOpenAI

    lat: list[float] = []
    ttft: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def one(client: AsyncOpenAI, i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        chat = chat_every > 0 and i % chat_every == 1  # alternate endpoints
        if stream:
            first = None
            if chat:
                s = await client.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": f"Hello, {NAMES[i % len(NAMES)].title()}"}],
                    max_tokens=max_tokens, stream=True, seed=i, stream_options={"include_usage": True})
            else:
                s = await client.completions.create(model="bench", prompt=prompt(i), max_tokens=max_tokens,
                                                    stream=True, seed=i, stream_options={"include_usage": True},
                                                    extra_body=body or {})
            chunks, used = 0, None
            async for ch in s:
                if first is None and ch.choices:
                    first = time.perf_counter() - t0
                if ch.choices and (getattr(ch.choices[0], "text", None) or getattr(
                        getattr(ch.choices[0], "delta", None), "content", None)):
                    chunks += 1
                if ch.usage is not None:
                    used = ch.usage.completion_tokens
            tokens += used if used is not None else chunks
            if first is not None:
                ttft.append(first)
        elif chat:
            r = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": f"Hello, {NAMES[i % len(NAMES)].title()}"}],
                max_tokens=max_tokens, seed=i)
            tokens += r.usage.completion_tokens
        else:
            r = await client.completions.create(model="bench", prompt=prompt(i), max_tokens=max_tokens, seed=i)
            tokens += r.usage.completion_tokens
        lat.append(time.perf_counter() - t0)

    async def worker(c: int, client: AsyncOpenAI) -> None:
        for k in range(per_client):
            try:
                await one(client, c * per_client + k)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{type(e).__name__}: {e}")

    # Every client exists and has made a request (GET /v1/models) before the clock starts: a new
    # client's construction and first request hold this event loop for ~50 ms each (the openai
    # client's one-time set-up), during which the streams already running go unread. At 8 clients
    # that had added ~450 ms to the first wave's measured TTFT, for both servers, while the
    # server's own first tokens came after ~60 ms.
    # max_retries=0: a 503 or a dropped connection must count as an error, not be retried away.
    pool = [AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout) for _ in range(clients)]
    try:
        await asyncio.gather(*(client.models.list() for client in pool))
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(c, pool[c]) for c in range(clients))), timeout * per_client + 30)
        wall = time.perf_counter() - t0
    finally:
        for client in pool:
            await client.close()
    return summary(clients * per_client, lat, ttft, errors, tokens, wall)


def random_packed_model(name: str, out: str) -> None:
    """A packed folder with random weights of preset ``name`` and a byte tokenizer."""
    from dataclasses import replace

    from tritlm.data.tokenizer import ByteTokenizer
    from tritlm.formats.packed import random_packed, save_packed
    from tritlm.model.config import preset

    tok = ByteTokenizer()
    pm = random_packed(preset(name, vocab_size=tok.vocab_size))
    save_packed(replace(pm, tokenizer=tok), out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model to serve (default: train the tiny FP model into a temp folder)")
    ap.add_argument("--preset", help="serve a random packed model of this preset (byte vocabulary) instead: "
                                     "what continuous batching is for (a memory-bound decode)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="total requests (split evenly over clients)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", default="1,8", help="comma-separated tritlm serve --max-batch values to compare")
    ap.add_argument("--threads", type=int, help="torch threads in the server (OMP_NUM_THREADS)")
    ap.add_argument("--stream", action="store_true", help="streaming requests (also measures time to first token)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    ap.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS-serve.md")
    ap.add_argument("--sweep", help="comma-separated concurrent streaming client counts (e.g. 1,2,4,8,16): one "
                                    "server, measured at each; --max-batch then takes one value")
    ap.add_argument("--requests-per-level", type=int, default=16,
                    help="--sweep: requests at each client count, spread over its clients (N / clients each, at "
                         "least 1): every count does the same work, so one client's run is as long as eight's")
    ap.add_argument("--llama-server", help="--sweep: also measure llama.cpp's llama-server (a path, or auto: "
                                           "what benchmarks/build_llama_tools.sh built) on the same weights")
    ap.add_argument("--parallel", type=int, default=8, help="llama-server --parallel (default 8)")
    ap.add_argument("--rounds", type=int, default=1, help="--sweep: interleaved rounds of both servers")
    ap.add_argument("--kv-dtype", choices=("f16", "q8"), default="f16",
                    help="--sweep: both servers' KV cache (q8: tritlm serve --kv-dtype q8, llama-server -ctk / "
                         "-ctv q8_0 with flash attention)")
    ap.add_argument("--client", choices=("aiohttp", "openai"), default="aiohttp",
                    help="--sweep: the load generator driving both servers (aiohttp: benchmarks/stream_load.py, "
                         "~0.08 ms of CPU a streamed token here; openai: the openai package's AsyncOpenAI, ~0.36)")
    a = ap.parse_args()
    if a.sweep:
        return sweep(a)

    tmp = None
    model = a.model
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="tritlm-bench-serve-")
        model = str(Path(tmp.name) / (a.preset or "tiny"))
        if a.preset:
            random_packed_model(a.preset, model)
        else:
            subprocess.run([sys.executable, "-m", "tritlm", "train", *TINY, "--out", model], check=True,
                           stdout=subprocess.DEVNULL, timeout=600)
    per_client = max(1, a.requests // a.clients)
    rows = []
    for w in (int(x) for x in a.max_batch.split(",")):
        proc, url = start_server(model, w, max_queue=a.clients, threads=a.threads)
        try:
            asyncio.run(run_load(url, 2, 1, a.max_tokens, a.stream, a.timeout))  # warm-up
            r = asyncio.run(run_load(url, a.clients, per_client, a.max_tokens, a.stream, a.timeout))
        finally:
            stop(proc)
        r["max_batch"] = w
        rows.append(r)
        ttft = f"  ttft p50 {r['ttft_p50'] * 1e3:.0f} ms p95 {r['ttft_p95'] * 1e3:.0f} ms" if a.stream else ""
        print(f"max_batch={w}: {r['ok']}/{r['n']} ok, {len(r['errors'])} errors, p50 {r['p50'] * 1e3:.0f} ms, "
              f"p95 {r['p95'] * 1e3:.0f} ms, p99 {r['p99'] * 1e3:.0f} ms, {r['req_s']:.1f} req/s, "
              f"{r['tok_s']:.0f} tok/s, wall {r['wall_s']:.1f} s{ttft}")
        for e in r["errors"][:5]:
            print("  error:", e)
    if a.write:
        out = ROOT / "benchmarks" / "RESULTS-serve.md"
        new = not out.exists()
        with out.open("a") as f:
            if new:
                f.write("# `tritlm serve` load test\n\nProduced by `benchmarks/bench_serve.py`; latency is per "
                        "request, client side, over loopback.\n")
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} - {platform.machine()}, {os.cpu_count()} CPUs "
                    f"(shared), torch threads {a.threads or 'default'}\n\n")
            what = a.model or (f"random packed {a.preset} (byte vocab)" if a.preset
                               else "tiny FP (dim 32, 1 layer, char vocab 65)")
            f.write(f"model `{what}`, {a.clients} concurrent "
                    f"clients, {per_client * a.clients} requests, max_tokens {a.max_tokens}, "
                    f"{'streaming' if a.stream else 'non-streaming'}, completions and chat alternating\n\n")
            f.write("| max_batch | ok / total | errors | p50 ms | p95 ms | p99 ms | req/s | tokens/s |"
                    + (" TTFT p50 ms | TTFT p95 ms |" if a.stream else "") + "\n")
            f.write("|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if a.stream else "") + "\n")
            for r in rows:
                f.write(f"| {r['max_batch']} | {r['ok']} / {r['n']} | {len(r['errors'])} | {r['p50'] * 1e3:.0f} | "
                        f"{r['p95'] * 1e3:.0f} | {r['p99'] * 1e3:.0f} | {r['req_s']:.1f} | {r['tok_s']:.0f} |"
                        + (f" {r['ttft_p50'] * 1e3:.0f} | {r['ttft_p95'] * 1e3:.0f} |" if a.stream else "") + "\n")
        print(f"appended to {out}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if any(r["errors"] for r in rows) else 0


def sweep(a: argparse.Namespace) -> int:
    """Aggregate tok/s and TTFT at each client count: tritlm serve, then llama-server, per round."""
    if not a.preset and not a.model:
        raise SystemExit("--sweep needs --preset (a random packed model) or --model (a packed folder)")
    counts = [int(x) for x in a.sweep.split(",") if x.strip()]
    threads = a.threads or 2
    tmp = tempfile.TemporaryDirectory(prefix="tritlm-bench-serve-")
    model = a.model
    if model is None:
        model = str(Path(tmp.name) / a.preset)
        random_packed_model(a.preset, model)
    from tritlm.formats.packed import load_packed

    tok = load_packed(model).tokenizer
    # Every request runs to max_tokens on both servers (a random model samples EOS now and then):
    # EOS banned through the standard logit_bias, plus llama-server's own ignore_eos. A byte
    # vocabulary also has its bytes >= 0x80 banned: random ones rarely make whole UTF-8 characters,
    # and both servers hold back text until they do, which would measure the detokeniser, not
    # the time to the first token.
    ban = [tok.eos_id] if tok.eos_id is not None else []
    if tok.vocab_size <= 260:
        ban += [i for i in range(128, 256) if i != tok.eos_id]
    body = {"ignore_eos": True, **({"logit_bias": {str(i): -100 for i in ban}} if ban else {})}
    servers = [("tritlm", None)]
    if a.llama_server:
        binary = find_llama_server(a.llama_server)
        if binary is None:
            print("llama-server not built (run benchmarks/build_llama_tools.sh); measuring tritlm only")
        else:
            from tritlm.infer.bench_llama_cpp import gguf_for

            servers.append(("llama-server", (binary, str(gguf_for(load_packed(model), "f16")))))
    max_batch = int(a.max_batch.split(",")[-1])

    def load(url: str, clients: int, per_client: int, max_tokens: int):
        if a.client == "openai":
            return run_load(url, clients, per_client, max_tokens, True, a.timeout, chat_every=0, body=body)
        return run_stream_load(url, clients, per_client, max_tokens, a.timeout, prompt, body)

    def per_client(clients: int) -> int:
        # a fixed number of requests per level, as vLLM's benchmark_serving (--num-prompts at each
        # --max-concurrency): with a fixed number per client, one client's run was ~1 s (2 requests of
        # 64 tokens), short enough for this host's drift to move the 1-client rate 6-10% between sweeps
        return max(1, -(-a.requests_per_level // clients))

    rows = []
    for rnd in range(a.rounds):
        for name, peer in servers:
            if peer is None:
                proc, url = start_server(model, max_batch, max_queue=max(counts) * 2, threads=threads,
                                         kv_dtype=a.kv_dtype)
            else:
                proc, url = start_llama_server(peer[0], peer[1], a.parallel, threads, ctx_per_slot=512,
                                               kv_dtype=a.kv_dtype)
            try:
                # warm-up at the widest batch and full length: the KV cache has grown to what every level
                # needs before any level is measured
                asyncio.run(load(url, min(max(counts), max_batch if peer is None else a.parallel), 1, a.max_tokens))
                for c in counts:
                    r = asyncio.run(load(url, c, per_client(c), a.max_tokens))
                    r.update(server=name, clients=c, round=rnd)
                    rows.append(r)
                    print(f"round {rnd} {name:12} clients {c:>2}: {r['ok']}/{r['n']} ok, {r['tok_s']:7.1f} tok/s "
                          f"aggregate, ttft p50 {r['ttft_p50'] * 1e3:6.0f} ms p95 {r['ttft_p95'] * 1e3:6.0f} ms, "
                          f"{r['tokens']} tokens in {r['wall_s']:.1f} s", flush=True)
                    for e in r["errors"][:3]:
                        print("  error:", e)
            finally:
                stop(proc)
    base = {n: statistics.median([r["tok_s"] for r in rows if r["server"] == n and r["clients"] == counts[0]])
            for n, _ in servers}
    lines = ["| server | clients | tok/s aggregate (median) | x its 1-client | per round | TTFT p50 ms | TTFT p95 ms "
             "| ok / total |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, _ in servers:
        # each round's ratio pairs two runs seconds apart: the host's drift between rounds cancels
        one = {r["round"]: r["tok_s"] for r in rows if r["server"] == n and r["clients"] == counts[0]}
        for c in counts:
            rs = [r for r in rows if r["server"] == n and r["clients"] == c]
            tps = statistics.median([r["tok_s"] for r in rs])
            per_round = sorted(r["tok_s"] / one[r["round"]] for r in rs if one.get(r["round"]))
            spread = f"{per_round[0]:.2f}-{per_round[-1]:.2f}" if per_round else "-"
            lines.append(f"| {n} | {c} | {tps:.1f} | {tps / base[n]:.2f} | {spread} | "
                         f"{statistics.median([r['ttft_p50'] for r in rs]) * 1e3:.0f} | "
                         f"{statistics.median([r['ttft_p95'] for r in rs]) * 1e3:.0f} | "
                         f"{sum(r['ok'] for r in rs)} / {sum(r['n'] for r in rs)} |")
    print("\n".join(lines))
    if a.write:
        out = ROOT / "benchmarks" / "RESULTS-serve.md"
        with out.open("a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} - client sweep, {platform.machine()}, {os.cpu_count()} "
                    f"CPUs, {threads} threads per server\n\n")
            f.write(f"model `{a.model or f'random packed {a.preset} (byte vocab)'}`; tritlm serve --max-batch "
                    f"{max_batch}" + (f", llama-server --parallel {a.parallel} --cont-batching on the TQ2_0 GGUF"
                                      if len(servers) > 1 else "")
                    + f"; KV cache {a.kv_dtype} on both; streaming completions, max_tokens {a.max_tokens}, "
                      f"{a.requests_per_level} requests at each client count, {a.rounds} interleaved round(s), client "
                      f"{a.client}\n\n")
            f.write("\n".join(lines) + "\n")
        print(f"appended to {out}")
    tmp.cleanup()
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
