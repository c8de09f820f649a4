"""GPU measurements: the Triton kernels against cuBLAS bf16, whole-model decode, training steps.

What ``benchmarks/bench_gpu.py`` and ``tritlm bench --device cuda`` print. Every ratio is measured
in the same run on the same device:

* kernels: ``ternary_linear`` (2-bit weights, int8 activations) vs ``torch.matmul`` in bf16 at
  several M, timed with CUDA events over copies of the weights rotated beyond the L2 cache (a
  GEMV that hits L2 measures L2, not HBM); effective bandwidth as a fraction of a measured
  device-to-device copy (the floor a memory-bound kernel can reach) and of the spec sheet's peak.
* decode: the packed model on the GPU runtime (``Engine(backend="triton")``, with and without CUDA
  graphs) vs the same weights dense in bf16 through the same forward, both with graphs.
* training: a BitLinear step (Triton int8 forward, bf16 backward) vs ``nn.Linear`` in bf16, and
  whole training steps of preset models with MFU.

``smoke=True`` shrinks every shape so the same code runs on CPU tensors (Triton's interpreter):
the tests run it to keep the benchmark working on machines without a GPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# HBM bandwidth of the spec sheets (bytes/s), to report a fraction of peak beside the measured copy
PEAK_HBM = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40": 0.864e12, "4090": 1.008e12}

# (name, n, k): the block Linears of the 700M, 2B4T and 7B shapes (q|k|v and gate|up fused as run)
KERNEL_SHAPES = [
    ("700M qkv", 4608, 1536), ("700M gate_up", 8192, 1536), ("700M down", 1536, 4096),
    ("2B4T qkv", 3840, 2560), ("2B4T gate_up", 13824, 2560), ("2B4T down", 2560, 6912),
    ("7B qkv", 12288, 4096), ("7B gate", 11008, 4096), ("7B down", 4096, 11008),
]
KERNEL_MS = [1, 16, 128, 2048]
SMOKE_SHAPES = [("smoke a", 40, 70), ("smoke b", 24, 130)]
SMOKE_MS = [1, 5, 20]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[int], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Seconds per call of ``fn(i)`` (``i`` picks the rotated copy), the median of 3 timed loops:
    CUDA events on a GPU, perf_counter elsewhere."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    runs = []
    for _ in range(3):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(reps):
                fn(i)
            b.record()
            b.synchronize()
            runs.append(a.elapsed_time(b) / 1e3 / reps)
        else:
            t = time.perf_counter()
            for i in range(reps):
                fn(i)
            runs.append((time.perf_counter() - t) / reps)
    return sorted(runs)[1]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical floor of memory-bound kernels."""
    n = nbytes // 4 if device.type == "cuda" else 1 << 20
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    t = time_per_call(lambda i: dst.copy_(src), device, reps=10, warmup=2)
    return 2 * 4 * n / t


def peak_hbm(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_HBM.items() if k in name), None)


def _copies(nbytes: int, device: torch.device) -> int:
    """Copies of a weight that rotate beyond the L2 cache (twice its size)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(1, min(64, -(-2 * l2 // max(1, nbytes))))


@dataclass
class KernelRow:
    shape: str
    n: int
    k: int
    m: int
    ternary_us: float
    bf16_us: float
    ternary_gbs: float  # effective GB/s: weights + activations + outputs
    bf16_gbs: float

    @property
    def speedup(self) -> float:
        return self.bf16_us / self.ternary_us


def bench_kernels(device: torch.device, shapes=None, ms=None, reps: int = 50) -> list[KernelRow]:
    """Triton ternary vs bf16 ``torch.matmul`` on every shape and M."""
    from tritlm.kernels.triton.layout import pack_t2
    from tritlm.kernels.triton.ternary_mm import ternary_linear

    shapes, ms = shapes or KERNEL_SHAPES, ms or KERNEL_MS
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, n, k in shapes:
        lv = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
        packed = pack_t2(lv).to(device)
        w16 = (lv.to(torch.bfloat16) * 0.02).to(device)
        pc, wc = _copies(packed.numel(), device), _copies(w16.numel() * 2, device)
        packs = [packed] + [packed.clone() for _ in range(pc - 1)]
        ws = [w16] + [w16.clone() for _ in range(wc - 1)]
        scale = torch.full((n,), 0.02, device=device)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=device)
            t3 = time_per_call(lambda i, x=x, out=out, packs=packs, scale=scale, k=k:
                               ternary_linear(x, packs[i % len(packs)], scale, k, out), device, reps)
            tb = time_per_call(lambda i, x=x, ws=ws: torch.matmul(x, ws[i % len(ws)].t()), device, reps)
            b3 = n * ((k + 3) // 4) + 4 * n + 2 * m * k + 4 * m * n
            bb = 2 * n * k + 2 * m * k + 2 * m * n
            rows.append(KernelRow(name, n, k, m, 1e6 * t3, 1e6 * tb, b3 / t3 / 1e9, bb / tb / 1e9))
    return rows


@dataclass
class DecodeRow:
    model: str
    runtime: str  # "ternary triton (graphs)" | "ternary triton (eager)" | "dense bf16 (graphs)"
    prefill_tok_s: float
    decode_tok_s: float
    batch8_tok_s: float
    weight_mb: float


def bench_decode(device: torch.device, models=("700M", "2B4T"), prompt_tokens: int = 128,
                 decode_tokens: int = 64, smoke: bool = False) -> list[DecodeRow]:
    """Whole-model prefill / decode / 8-sequence decode, the GPU runtime vs dense bf16."""
    from tritlm.formats.packed import random_packed
    from tritlm.infer.engine import Engine
    from tritlm.model.config import ModelConfig, preset

    rows = []
    for name in models:
        if smoke:
            cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)
        else:
            cfg = preset("bitnet-2b4t" if name == "2B4T" else name, vocab_size=32000, max_seq_len=1024)
        pm = random_packed(cfg)
        mb = sum(pm.weight_bytes().values()) / 2**20
        for label, kw in (("ternary triton", dict(backend="triton")),
                          ("dense bf16", dict(backend="dense", dense_dtype=torch.bfloat16))):
            eng = Engine(pm, device=device, slots=8, head="f16", cuda_graphs=True, **kw)
            graphs = eng.graphs
            modes = [("graphs", graphs), ("eager", None)] if kw["backend"] == "triton" else [("graphs", graphs)]
            for mode, g in modes:  # one engine (the weights are built once), graphs on then off
                eng.graphs = g
                eng.reset()
                rows.append(DecodeRow(name, f"{label} ({mode})", *_decode_speeds(eng, cfg, prompt_tokens,
                                                                                  decode_tokens, device), mb))
            del eng, graphs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _decode_speeds(eng, cfg, prompt_tokens: int, decode_tokens: int, device: torch.device) -> tuple:
    """(prefill tok/s, one-sequence decode tok/s, 8-sequence decode tok/s) of one engine."""
    prompt = [(7 * i) % cfg.vocab_size for i in range(1, prompt_tokens + 1)]
    eng.prefill(prompt)  # warm-up: compiles the kernels
    eng.reset()
    _sync(device)
    t = time.perf_counter()
    logits = eng.prefill(prompt)
    pre = prompt_tokens / (time.perf_counter() - t)
    tok = int(logits.argmax())
    for _ in range(3):  # warm-up: records the graphs
        tok = int(eng.forward_seq([tok])[-1].argmax())
    t = time.perf_counter()
    for _ in range(decode_tokens):
        tok = int(eng.forward_seq([tok])[-1].argmax())
    dec = decode_tokens / (time.perf_counter() - t)
    for s in range(1, 8):
        eng.prefill(prompt[:16 + s], slot=s)
    toks = [tok] * 8
    for _ in range(3):
        toks = eng.decode_batch(toks, list(range(8))).argmax(-1).tolist()
    t = time.perf_counter()
    for _ in range(decode_tokens // 2):
        toks = eng.decode_batch(toks, list(range(8))).argmax(-1).tolist()
    return pre, dec, 8 * (decode_tokens // 2) / (time.perf_counter() - t)


@dataclass
class TrainRow:
    what: str
    ms: float
    tok_s: float
    mfu: float | None  # of the bf16 dense peak


def _set_kernel(model: torch.nn.Module, kind: str) -> None:
    import tritlm.nn as tnn

    fn = getattr(tnn, "set_kernel", None)
    if fn is None:
        raise RuntimeError("tritlm.nn.set_kernel is missing: this build has no Triton BitLinear")
    fn(model, kind)


def bench_train(device: torch.device, presets=("125M", "1.3B"), smoke: bool = False) -> list[TrainRow]:
    """A BitLinear fwd+bwd (Triton, and the torch path) vs ``nn.Linear`` in bf16; whole training
    steps (bf16 autocast, fused AdamW where there is one) of the presets, ternary and FP, with MFU."""
    from tritlm.model.config import ModelConfig, preset
    from tritlm.nn.bitlinear import BitLinear
    from tritlm.quant.config import QuantConfig
    from tritlm.train.metrics import measure_peak_flops

    peak = measure_peak_flops(device)
    rows: list[TrainRow] = []
    m, k, n = (64, 40, 56) if smoke else (16384, 2048, 5632)
    reps = 1 if smoke else 20
    ac = torch.autocast(device.type, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=device, requires_grad=True)
    layers = {"nn.Linear bf16": torch.nn.Linear(k, n, bias=False, device=device)}
    for kind in ("triton", "torch"):
        bl = BitLinear(k, n, device=device)
        try:
            _set_kernel(bl, kind)
        except RuntimeError:
            if kind == "triton":
                continue
        layers[f"BitLinear {kind}"] = bl

    def step(layer):
        def f(_i):
            with ac:
                y = layer(x)
            y.float().sum().backward()
        return f

    for label, layer in layers.items():
        t = time_per_call(step(layer), device, reps, warmup=2)
        rows.append(TrainRow(f"{label} fwd+bwd [{m}x{k}] -> {n}", 1e3 * t, m / t, 6 * m * k * n / t / peak))
    for name in presets:
        for quant, kernel in (("ternary", "triton"), ("ternary", "torch"), ("fp", None)):
            if smoke:
                cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=32)
            else:
                cfg = preset(name, vocab_size=32000)
            if quant == "fp":
                cfg = dataclasses.replace(cfg, quant=QuantConfig(weight="fp", act_bits=None))
            rows.append(_train_step_row(cfg, name, quant, kernel, device, peak, smoke))
    return rows


def _train_step_row(cfg, name: str, quant: str, kernel: str | None, device: torch.device, peak: float,
                    smoke: bool) -> TrainRow:
    from tritlm.model.transformer import Transformer

    batch, seq = (2, 32) if smoke else ((16, 2048) if name == "125M" else (8, 2048))
    model = Transformer(cfg).to(device)
    label = f"{name} {quant}" + (f" ({kernel})" if kernel else "")
    if kernel is not None:
        try:
            _set_kernel(model, kernel)
        except RuntimeError:
            if kernel == "triton":
                return TrainRow(f"{label}: no Triton BitLinear in this build", float("nan"), 0.0, None)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def f(_i):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time_per_call(f, device, 1 if smoke else 10, warmup=1 if smoke else 3)
    tok = batch * seq / t
    mfu = model.flops_per_token(seq) * tok / peak
    model.to("meta")  # frees the device memory before the next preset
    opt.state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return TrainRow(f"{label} step, {batch}x{seq} tokens", 1e3 * t, tok, mfu)
