"""The GPU runtime (Engine backend "triton"): the same Transformer forward with the Triton kernels,
the KV cache on the device. Without CUDA it runs on CPU tensors in Triton's interpreter (see
tests/conftest.py), which checks the whole path (layout, kernels, cache, batching) but not speed."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch
from tiny_models import tiny_model  # noqa: E402  (tests/infer helper)

from tritlm.formats.packed import from_transformer
from tritlm.infer.engine import Engine
from tritlm.infer.sampling import SamplingParams
from tritlm.quant.config import QuantConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(temperature=0)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kw", [
    {"n_kv_heads": 2},
    {"mlp": "relu2", "sub_norm": True, "tie_embeddings": True},
    {"quant": QuantConfig(input_norm=True)},
], ids=["gqa", "relu2-subln-tied", "input-norm"])
def test_triton_runtime_matches_the_packed_cpu_runtime(kw):
    """Both runtimes compute the packed math (int8 activations x ternary levels): the logits agree
    to float rounding, over prefill (the GEMM, M > 16) and decode (the GEMV)."""
    pm = from_transformer(tiny_model(**kw), fp_dtype="fp32")
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    cpu = Engine(pm, kv_dtype="f32")  # the GPU runtime keeps float32 K/V
    gpu = Engine(pm, backend="triton", device=DEVICE)
    assert gpu.k_cache[0].device.type == DEVICE
    assert _max_rel(gpu.logits(ids), cpu.logits(ids)) < 1e-4
    cpu.reset(), gpu.reset()
    cpu.prefill(ids[:20]), gpu.prefill(ids[:20])
    for t in ids[20:]:
        a, b = cpu.forward_seq([t])[-1], gpu.forward_seq([t])[-1]
        assert a.device.type == "cpu" and b.device.type == "cpu"
        assert _max_rel(b, a) < 1e-4


def test_triton_runtime_batches_and_generates_like_the_cpu_runtime():
    pm = from_transformer(tiny_model(n_kv_heads=2), fp_dtype="fp32")
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7, 7, 7, 7, 7, 7, 7, 7]]
    want = Engine(pm, slots=3).generate_batch(prompts, 8, GREEDY)
    got = Engine(pm, backend="triton", device=DEVICE, slots=1).generate_batch(prompts, 8, GREEDY)
    assert got == want


def test_packed_backend_refuses_a_gpu_device():
    pm = from_transformer(tiny_model(), fp_dtype="fp32")
    with pytest.raises(ValueError, match="packed backend runs on the CPU"):
        Engine(pm, backend="packed", device="meta")


# the kernels are the other tests' business: on the CPU the cheap dense backend checks the step
@pytest.mark.parametrize("backend", ["dense"] + (["triton"] if DEVICE == "cuda" else []))
def test_static_graph_step_matches_the_eager_step(backend):
    """The CUDA-graph decode step (infer/graph_decode.py) without the recording: static device
    tensors for ids / slots / positions, index_put into the cache, a bucketed attention window.
    Its logits equal the eager step's, across bucket boundaries, for one sequence and a batch in
    consecutive slots; a batch in scattered slots falls back to the eager step."""
    from tritlm.infer.graph_decode import GraphDecoder

    pm = from_transformer(tiny_model(n_kv_heads=2), fp_dtype="fp32")
    kw = dict(backend=backend, device=DEVICE, slots=4, cuda_graphs=False)
    eager, static = Engine(pm, **kw), Engine(pm, **kw)
    static.graphs = GraphDecoder(static, capture=DEVICE == "cuda", bucket=8)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [2, 7]]
    for e in (eager, static):
        for s, p in enumerate(prompts):
            e.prefill(p, slot=s)
    g = torch.Generator().manual_seed(0)
    for step in range(7):  # positions 3..14: crosses the 8-position bucket
        toks = torch.randint(0, 97, (4,), generator=g).tolist()
        slots = [0, 1, 2] if step % 2 else [1, 3]  # consecutive, then scattered (eager fallback)
        toks = toks[:len(slots)]
        a, b = eager.decode_batch(toks, slots), static.decode_batch(toks, slots)
        assert _max_rel(b, a) < 1e-5, step
        a, b = eager.forward_seq([toks[0]], slot=3)[-1], static.forward_seq([toks[0]], slot=3)[-1]
        assert _max_rel(b, a) < 1e-5
    assert {k[0] for k in static.graphs.steps} == {1, 3}  # one-row and three-row steps were taken
    assert {k[2] for k in static.graphs.steps} >= {8, 16}  # in both buckets
