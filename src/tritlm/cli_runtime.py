"""The packed CPU runtime commands of ``tritlm``: ``pack``, ``bench``, ``chat``, ``profile``,
``models``. Parse, call the library (:mod:`tritlm.formats.packed`, :mod:`tritlm.infer`), print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tritlm.errors import ConfigError, TritlmError


def cmd_pack(a: argparse.Namespace) -> int:
    if Path(a.out).exists() and not a.force:
        raise ConfigError(f"{a.out} exists; choose another output folder or pass --force to replace it")
    from tritlm.formats.packed import pack_model
    from tritlm.model.config import load_quant_spec
    from tritlm.registry import resolve_path

    spec = load_quant_spec(a.quant_spec) if a.quant_spec else None
    path, rep = pack_model(resolve_path(a.checkpoint), a.out, fp_dtype=a.fp_dtype, quant_spec=spec,
                           quant=a.quant, overwrite=a.force, ternary_layout=a.ternary_layout)
    print(json.dumps({"out": str(path), **rep}, indent=2))
    return 0


# ---- bench ---------------------------------------------------------------------------------------
def bench_lines(res: dict) -> list[str]:
    """The text table of :func:`tritlm.infer.profile.bench_models`' result."""
    lines = [f"# tritlm bench  {res['date']}  {res['cpu']}  torch {res['torch']}  kernel {res['kernel']}",
             f"# decode: {res['decode_tokens']} tokens after an 8-token prompt; prefill: "
             f"{res['prompt_tokens']}-token prompt",
             f"{'model':6} {'impl':36} {'thr':>3} {'decode tok/s':>12} {'prefill tok/s':>13}  notes"]
    for mres in res["models"]:
        for r in mres["rows"]:
            pre = "" if r["prefill"] is None else f"{r['prefill']:.1f}"
            note = ""
            if "read_GBps" in r:
                lo, hi = r.get("read_GBps_range", (r["read_GBps"], r["read_GBps"]))
                note = (f"{r['read_GBps']:.1f} GB/s read (median; {lo:.1f}-{hi:.1f}), "
                        f"{mres['bytes_per_decode_token'] / 1e6:.0f} MB/token")
            elif "native_share" in r:
                note = f"Python {100 * (1 - r['native_share']):.0f}% of a decode step (C step + head: the rest)"
            elif "kernel_share" in r:
                note = f"kernels {100 * r['kernel_share']:.0f}% of a decode step"
            elif "decode_tokens" in r:
                note = f"decode over {r['decode_tokens']} tokens"
            if "decode_range" in r and r["decode_runs"] > 1:
                lo, hi = r["decode_range"]
                plo, phi = r["prefill_range"]
                note = (f"median of {r['decode_runs']} (decode {lo:.1f}-{hi:.1f}, prefill {plo:.0f}-{phi:.0f})"
                        + (f"; {note}" if note else ""))
            lines.append(f"{mres['model']:6} {r['impl']:36} {r['threads']:>3} {r['decode']:>12.1f} {pre:>13}  {note}")
        for q in mres["ratios"]:
            pre = "" if q["prefill"] is None else f"{q['prefill']:.2f}x"
            lines.append(f"{mres['model']:6} tritlm / {q['vs']:<31} {q['threads']:>3} {q['decode']:>11.2f}x "
                         f"{pre:>13}")
        lines.append(f"{mres['model']:6} llama.cpp: {mres['llama_cpp']}")
    return lines


def cmd_bench(a: argparse.Namespace) -> int:
    from tritlm.cli import require_int

    try:
        threads = [int(x) for x in str(a.threads).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--threads {a.threads!r}: not a comma-separated list of integers") from None
    if not threads or min(threads) < 1:
        raise ConfigError(f"--threads {a.threads!r}: every thread count must be >= 1")
    require_int("--decode-tokens", a.decode_tokens, 1)
    require_int("--prompt-tokens", a.prompt_tokens, 1)
    require_int("--reps", a.reps, 1)
    from tritlm.api import resolve_device

    dev = resolve_device(a.device)
    if dev.type == "cuda":
        return _bench_gpu(a, dev)
    from tritlm.infer.profile import bench_models
    from tritlm.model.config import load_quant_spec

    res = bench_models([m for m in a.models.split(",") if m], threads,
                       decode_tokens=a.decode_tokens, prompt_tokens=a.prompt_tokens, dense=not a.no_dense,
                       head=a.head, tune=a.tune, reps=a.reps, kv_dtype=a.kv_dtype,
                       quant_spec=load_quant_spec(a.quant_spec) if a.quant_spec else None)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print("\n".join(bench_lines(res)))
    return 0


def _bench_gpu(a: argparse.Namespace, dev) -> int:
    """``tritlm bench --device cuda``: the GPU runtime vs dense bf16 (benchmarks/bench_gpu.py has
    the kernel and training sections too)."""
    from dataclasses import asdict

    from tritlm.infer.gpu_bench import bench_decode

    rows = bench_decode(dev, [m for m in a.models.split(",") if m], a.prompt_tokens, a.decode_tokens)
    if a.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'model':8} {'runtime':26} {'prefill tok/s':>13} {'decode tok/s':>12} {'8 seqs tok/s':>12}")
    for r in rows:
        print(f"{r.model:8} {r.runtime:26} {r.prefill_tok_s:>13.0f} {r.decode_tok_s:>12.1f} {r.batch8_tok_s:>12.1f}")
    return 0


# ---- chat ----------------------------------------------------------------------------------------
def cmd_chat(a: argparse.Namespace) -> int:
    from tritlm.cli import require_int, require_tokenizer
    from tritlm.cli_sampling import sampling_kwargs, sampling_params

    require_int("--max-tokens", a.max_tokens, 1)
    import tritlm
    from tritlm.heap import freeze_startup_heap
    from tritlm.infer.chat import ChatSession, chat_repl
    from tritlm.infer.chat_template import load_chat_template

    class KeepGoing(ChatSession):
        """A message the tokenizer cannot encode (a character-level model meets a character it has
        never seen) is refused with a one-line note; the session and its history go on."""

        def reply(self, user, on_text=None):
            before = list(self.messages)
            try:
                return super().reply(user, on_text)
            except TritlmError as e:
                self.messages = before
                print(f"tritlm: {e} (message not sent; the conversation goes on)", file=sys.stderr)
                return ""

    kw = sampling_kwargs(a)
    sampling_params(**kw)  # checked before the model loads
    m = tritlm.load(a.model, a.device, a.kv_dtype)
    require_tokenizer(m, "chat")
    freeze_startup_heap()  # no full collection pausing a reply
    tmpl = load_chat_template(m.tokenizer, m.path, a.chat_template)
    chat = KeepGoing(m, m.sampling(**kw), a.max_tokens, a.system, template=tmpl)
    chat_repl(chat, sys.stdin, sys.stdout,
              banner=f"tritlm chat: {m.path} ({m.source}). /reset clears the history, /exit quits.")
    return 0


# ---- profile -------------------------------------------------------------------------------------
def profile_lines(r) -> list[str]:
    """The text report of a :class:`tritlm.infer.profile.ProfileReport`."""
    lines = [f"prefill {r.prompt_tokens} tokens: {1e3 * r.prefill_s:.1f} ms; decode on the per-layer (torch) "
             f"path: {1e3 * r.decode_s:.2f} ms/token ({1 / r.decode_s:.1f} tok/s), kernels "
             f"{100 * r.kernel_share:.0f}% of it"]
    if r.fused_decode_s is not None:
        lines.append(f"decode on the fused C path (the default; no per-layer hooks): {1e3 * r.fused_decode_s:.2f} "
                     f"ms/token ({1 / r.fused_decode_s:.1f} tok/s), Python "
                     f"{100 * (1 - r.fused_native_share):.0f}% of it")
    if r.fused_sections:
        lines.append(f"fused decode step by section (weights read once per token; ceiling = "
                     f"{r.read_bw / 1e9:.1f} GB/s measured read bandwidth):")
        lines.append(f"{'section':16} {'ms/token':>9} {'share':>6} {'MB/token':>9} {'GB/s':>6} {'ceiling':>8}")
        for s in r.fused_sections:
            gb = f"{s['gb_s']:6.1f}" if s["gb_s"] else f"{'':6}"
            ce = f"{100 * s['ceiling']:7.0f}%" if s["ceiling"] else f"{'':8}"
            lines.append(f"{s['section']:16} {s['ms_per_token']:>9.3f} {100 * s['share']:>5.0f}% "
                         f"{s['mb_per_token']:>9.2f} {gb} {ce}")
        lines.append("per-layer (torch) path, by module:")
    lines.append(f"{'section':16} {'calls':>6} {'total ms':>9} {'mean us':>9}")
    for name, n, tot, mean in r.sections:
        lines.append(f"{name:16} {n:>6} {tot:>9.2f} {mean:>9.1f}")
    lines.append(f"chrome trace: {r.trace}")
    if r.divergence is not None:
        lines.append(f"{'activation':12} {'layer':>5} {'rel diff (packed vs dense fp32)':>32}")
        for d in r.divergence:
            mark = "  <- first > 1e-2" if d["first_divergent"] else ""
            lines.append(f"{d['name']:12} {d['layer']:>5} {d['rel_diff']:>32.2e}{mark}")
    return lines


def cmd_profile(a: argparse.Namespace) -> int:
    from tritlm.cli import require_int

    require_int("--prompt-tokens", a.prompt_tokens, 1)
    require_int("--decode-tokens", a.decode_tokens, 1)
    require_int("--threads", a.threads, 1)
    from tritlm.infer.profile import profile_model

    r = profile_model(a.model, preset=a.preset, prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens,
                      threads=a.threads, trace=a.trace, compare=a.compare)
    print("\n".join(profile_lines(r)))
    return 0


# ---- models --------------------------------------------------------------------------------------
def cmd_models(a: argparse.Namespace) -> int:
    from tritlm.registry import list_models, register, registry_file, unregister

    if a.action == "add":
        if not (a.name and a.path):
            raise TritlmError("usage: tritlm models add NAME PATH")
        register(a.name, a.path)
    elif a.action == "remove":
        if not a.name:
            raise TritlmError("usage: tritlm models remove NAME")
        unregister(a.name)
    print(json.dumps({"registry": str(registry_file()), "models": list_models()}, indent=2))
    return 0


# ---- parser --------------------------------------------------------------------------------------
def add_runtime_commands(sub) -> None:
    s = sub.add_parser("pack", help="pack a model (checkpoint, GGUF, .1bit, transformers folder) for the CPU runtime; "
                                    "each layer in its kind, or re-quantised with --quant / --quant-spec")
    s.add_argument("checkpoint", metavar="model",
                   help="run folder, checkpoint folder, GGUF / .1bit file, transformers folder or registered name")
    s.add_argument("out", help="output folder (written atomically)")
    s.add_argument("--fp-dtype", choices=["fp16", "fp32", "bf16"], default="fp16",
                   help="dtype of embeddings and lm_head (norms stay fp32)")
    s.add_argument("--quant", metavar="KIND", choices=["ternary", "binary", "int8", "int4", "fp"],
                   help="post-training: re-quantise every block Linear to KIND first (the default of --quant-spec)")
    s.add_argument("--quant-spec", metavar="FILE.yaml",
                   help="post-training: per-layer kinds, a YAML mapping of globs over layer names to quant "
                        "configs (first match wins), e.g. '\"*.down_proj\": {weight: int4, group_size: 64}'")
    s.add_argument("--ternary-layout", choices=["i2s", "base3"], default="i2s",
                   help="ternary storage: i2s (2 bits, what the kernels read; default) or base3 (1.6 bits, "
                        "5 weights a byte, unpacked to i2s when the model loads)")
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.set_defaults(fn=cmd_pack)

    s = sub.add_parser("bench", help="CPU runtime speed: packed vs llama.cpp's llama-bench on the same weights and "
                                     "dense PyTorch (fp32/bf16), 700M and 125M")
    s.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    s.add_argument("--models", default="700M,125M",
                   help="comma-separated presets or packed model folders (default 700M,125M)")
    s.add_argument("--quant-spec", metavar="FILE.yaml",
                   help="per-layer kinds of the random preset models (a mixed model)")
    s.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    s.add_argument("--decode-tokens", type=int, default=64)
    s.add_argument("--prompt-tokens", type=int, default=128)
    s.add_argument("--no-dense", action="store_true", help="skip the dense PyTorch baselines")
    s.add_argument("--head", choices=["t4", "q8", "q4", "f16", "fp32"], default="t4",
                   help="LM head of the packed runtime (t4: 8 bits/weight, q8: int8 per row, q4: int4 per 32 "
                        "weights, approximate; f16, fp32: exact); llama.cpp gets Q8_0, Q8_0, Q4_0, F16, F32")
    s.add_argument("--kv-dtype", choices=["f16", "q8", "f32"], default="f16",
                   help="KV cache of the packed runtime (f16: the runtime's default and llama-bench's; q8: "
                        "int8 with a scale per head row)")
    s.add_argument("--tune", action="store_true",
                   help="autotune the kernel parameters of every shape first (cached for later runs)")
    s.add_argument("--reps", type=int, default=3,
                   help="repetitions of ours and llama-bench, interleaved; medians and ranges (default 3)")
    s.add_argument("--device", default="cpu", metavar="{cpu,cuda,cuda:N}",
                   help="cuda: the GPU runtime (Triton kernels, CUDA graphs) vs dense bf16 on the GPU, --models "
                        "as presets (benchmarks/bench_gpu.py adds kernels and training)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("chat", help="interactive chat with a model (history, the model's chat template or a "
                                    "plain-text default)")
    s.add_argument("model", help="packed folder, run folder or registered model name")
    s.add_argument("--system", default=None, help="system prompt")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--chat-template", help="Jinja chat template file (default: the model's, else plain text)")
    from tritlm.cli import add_device_arg, add_kv_dtype_arg
    from tritlm.cli_sampling import add_sampling_args

    add_kv_dtype_arg(s)
    add_device_arg(s)
    add_sampling_args(s, temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("profile", help="per-layer timing table + Chrome trace; layer tracer to compare runtimes")
    s.add_argument("model", nargs="?", help="packed folder or registered name of one (default: a random packed "
                                            "--preset model); pack a run folder first with tritlm pack")
    s.add_argument("--preset", default="125M", help="random packed model of this preset when no model is given")
    s.add_argument("--prompt-tokens", type=int, default=32)
    s.add_argument("--decode-tokens", type=int, default=16)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--trace", default="tritlm-trace.json", help="Chrome trace output (chrome://tracing, Perfetto)")
    s.add_argument("--compare", action="store_true",
                   help="trace per-layer activations of the packed engine and the dense reference; "
                        "report where they diverge")
    s.set_defaults(fn=cmd_profile)

    s = sub.add_parser("models", help="the model registry: names -> paths ($TRITLM_MODELS overrides the file)")
    s.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    s.add_argument("name", nargs="?")
    s.add_argument("path", nargs="?")
    s.set_defaults(fn=cmd_models)
