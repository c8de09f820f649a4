"""llama.cpp as the peer in ``tritlm bench``: the same random weights, exported as TQ2_0 GGUF.

The packed model is written with :func:`~tritlm.formats.gguf.export_gguf_packed` (llama arch,
ternary Linears in TQ2_0, token embeddings F16, output matrix Q8_0 next to our ``t4`` head, F16
next to our ``f16`` head, F32 next to ``fp32``) into the cache folder, once per model, and run
two ways with the same thread count and token counts as our runtime:

* ``llama-bench``, llama.cpp's own benchmark (``tg`` decode, ``pp`` prefill), built by
  ``benchmarks/build_llama_tools.sh``: what a llama.cpp user measures, and the peer the ratios use;
* ``llama-cpp-python``: one ``eval`` per token and a numpy argmax, labelled as such (it adds
  Python per token, so it is slower than llama.cpp itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# our head -> the GGUF output matrix type of about the same bytes and accuracy
HEAD_TYPES = {"t4": "Q8_0", "q8": "Q8_0", "q4": "Q4_0", "f16": "F16", "fp32": "F32"}


def open_llama(path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)`` with ggml's load-time weight repacking off.

    ggml converts Q4_0 / Q8_0 weights at load into layouts for its AMX and interleaved SIMD
    kernels (the CPU "extra buffer types"); on an AMX CPU, llama-cpp-python 0.3.36 segfaults in
    that path on small mixed-kind models (the Python process dies, no error to catch). The plain
    CPU path reads the same file with the same numbers, and TQ2_0 tensors are never repacked, so
    ternary timings are unchanged. llama-cpp-python has no argument for it, hence the patched
    default parameters while the model loads.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as low

    orig = low.llama_model_default_params

    def params():
        p = orig()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        low.llama_model_default_params = orig


def llama_bench_binary() -> Path | None:
    """``$TRITLM_LLAMA_BENCH``, else the newest ``llama-bench`` that build_llama_tools.sh built
    under the cache folder (``$TRITLM_CACHE_DIR`` or ``~/.cache/tritlm``); None when there is none."""
    import os

    from tritlm.kernels.cpu import cache_dir

    env = os.environ.get("TRITLM_LLAMA_BENCH")
    if env:
        return Path(env) if Path(env).is_file() else None
    roots = {cache_dir(), Path.home() / ".cache" / "tritlm"}  # where build_llama_tools.sh builds by default
    found = sorted((b for r in roots for b in r.glob("llama.cpp*/build/bin/llama-bench")),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def llama_bench(binary: Path, path: Path, threads: int, decode_tokens: int, prompt_tokens: int,
                reps: int = 1, timeout: float = 900) -> dict:
    """llama-bench's tok/s on ``path``: ``{"decode": tg tok/s, "prefill": pp tok/s, "samples": ...}``
    (the mean of ``reps`` runs each, as llama-bench reports it)."""
    import subprocess

    cmd = [str(binary), "-m", str(path), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(decode_tokens),
           "-r", str(reps), "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    repack = True
    if r.returncode < 0:  # killed by a signal: ggml's repack path (see open_llama); once more without it
        log.warning("llama-bench died (signal %d) with weight repacking on; running it with --repack 0",
                    -r.returncode)
        repack = False
        r = subprocess.run([*cmd, "--repack", "0"], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    runs = json.loads(r.stdout)
    out: dict = {"repack": repack}
    for e in runs:
        key = "prefill" if e.get("n_prompt", 0) > 0 and e.get("n_gen", 0) == 0 else "decode"
        out[key] = float(e["avg_ts"])
        out[f"{key}_samples"] = [float(x) for x in e.get("samples_ts", [])]
    if "decode" not in out or "prefill" not in out:
        raise RuntimeError("llama-bench printed no pp / tg result")
    return out


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_for(pm, head: str) -> Path:
    """The cached TQ2_0 GGUF of ``pm`` (written on first use; keyed by config, weights and head)."""
    from tritlm.data.tokenizer import ByteTokenizer
    from tritlm.formats.gguf import export_gguf_packed
    from tritlm.kernels.cpu import cache_dir

    h = hashlib.sha256(json.dumps(pm.config.to_dict(), sort_keys=True).encode())
    for name in sorted(pm.linears)[:4]:
        pl = pm.linears[name]
        h.update(pl.kind.encode())
        data = pl.weights.data if pl.scale is not None else pl.weights.numpy()
        h.update(np.asarray(data).reshape(-1)[: 1 << 16].tobytes())
        if pl.scale is not None:
            h.update(pl.scale.reshape(-1)[:4096].tobytes())
    head_type = HEAD_TYPES[head]
    path = cache_dir() / "bench" / f"tq2_0-{head_type}-{h.hexdigest()[:16]}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        tok = pm.tokenizer
        if tok is None:  # random weights: any vocabulary of the right size lets llama.cpp load it
            pm.tokenizer = ByteTokenizer()
        try:
            export_gguf_packed(pm, path, qtype="TQ2_0", fp_type="F16", head_type=head_type)
        finally:
            pm.tokenizer = tok
        log.info("wrote %s in %.1f s", path, time.perf_counter() - t)
    return path


def bench(path: Path, threads: int, decode_tokens: int, prompt_tokens: int, n_ctx: int) -> dict:
    """decode / prefill tok/s of llama.cpp on ``path`` (same prompts as our runtime's bench)."""
    llm = open_llama(path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                     verbose=False)
    try:
        prompt = [1, 2, 3, 4, 5, 6, 7, 8]

        def decode(n: int) -> float:
            llm.reset()
            llm.eval(prompt)
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t = time.perf_counter()
            for _ in range(n):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            return n / (time.perf_counter() - t)

        decode(4)  # warm-up: page the weights in, start the thread pool
        dec = decode(decode_tokens)
        ids = [((7 * i) % 1000 + 1) % llm.n_vocab() for i in range(prompt_tokens)]  # our bench's prompt
        best = float("inf")
        for _ in range(2):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            best = min(best, time.perf_counter() - t)
        return {"decode": dec, "prefill": prompt_tokens / best}
    finally:
        if hasattr(llm, "close"):  # frees the model and context now, not at garbage collection
            llm.close()
