"""Convert-for-runtime: the training Transformer, with packed Linear kinds swapped in.

gpt-fast's shape: one model definition; :func:`build_runtime_model` builds the ``Transformer`` of a
packed model's config on the meta device (no float weights are ever allocated), swaps every block
Linear for a :class:`~tritlm.nn.packed_linear.PackedLinearModule` (q|k|v and gate|up as one
row-fused module each, so one kernel call serves the group), the embedding and the LM head for
their runtime forms, and loads the norm weights. The forward pass that runs is the training
model's own (``tritlm.model.transformer``).

This module knows the model only by its module names (the Hugging Face Llama names), so it does
not import ``tritlm.model``: the caller passes the class to build.
"""

from __future__ import annotations

import torch
from torch import nn

from tritlm.nn.packed_linear import DenseLinear, F16Linear, PackedLinear, PackedLinearModule, TritPlaneHead, int_head

HEADS = ("auto", "f16", "fp32", "t4", "q8", "q4")
# weight bytes the head reads per token and weight (scales included: q8 one float per row of
# >= 256, q4 one per 32 weights)
HEAD_BYTES_PER_WEIGHT = {"fp32": 4.0, "f16": 2.0, "t4": 1.0, "q8": 1.0, "q4": 0.625}


class RuntimeEmbedding(nn.Module):
    """Token embedding read from its stored dtype (fp16 stays fp16 in memory), float32 out."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.w = weight.contiguous()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.w[idx].float()

    @property
    def weight(self) -> torch.Tensor:  # what Transformer.new_cache reads the device of
        return self.w


class RuntimeHead(nn.Module):
    """The LM head: ``f16`` (fp16 weights, C GEMV, exact), ``fp32`` (float32 matmul), ``t4`` (4
    ternary digit planes, approximate, 8 bits a weight), ``q8`` / ``q4`` (int8 per row / int4 per
    32 weights on the int kernels, approximate) or the dense baseline in ``dense_dtype``."""

    def __init__(self, w: torch.Tensor, kind: str, dense_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        if kind not in HEADS[1:]:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
        self.kind = kind
        self.device = torch.device(device)
        if self.device.type != "cpu":  # off the CPU the C heads do not exist: a dense matmul there
            self.kind = "fp32" if dense_dtype is None and kind == "fp32" else "f16"
            self.runner = DenseLinear(w.float(), dense_dtype or (torch.float32 if kind == "fp32" else torch.float16),
                                      self.device)
        elif dense_dtype is not None:
            self.runner = DenseLinear(w.float(), dense_dtype)
        elif kind == "t4":
            self.runner = TritPlaneHead(w)
        elif kind in ("q8", "q4"):
            self.runner = int_head(w, kind)
        elif kind == "f16":
            self.runner = F16Linear(w)
        else:
            self.runner = DenseLinear(w.float(), torch.float32)
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype is not torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        out = torch.empty(x2.shape[0], self.out_features, device=self.device)
        return self.runner(x2, out).view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def build_runtime_model(model_cls: type, cfg, linears: dict[str, PackedLinear], fp: dict[str, torch.Tensor], *,
                        backend: str = "packed", dense_dtype: torch.dtype = torch.float32, head: str = "auto",
                        max_len: int | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """``model_cls(cfg)`` (the Transformer) in eval mode with the runtime kinds swapped in.

    ``linears``: every block Linear's :class:`PackedLinear`; ``fp``: the other tensors by
    state-dict name (embeddings, norms, an untied lm_head). ``backend="dense"`` gives the dense
    PyTorch baseline (float weights in ``dense_dtype``) through the same forward; ``"triton"``
    the GPU runtime (``device`` cuda, or CPU tensors under ``TRITON_INTERPRET=1``). ``max_len``:
    positions the RoPE tables cover (default: the model's context).
    """
    device = torch.device(device)
    if backend == "packed" and device.type != "cpu":
        raise ValueError(f"the packed backend runs on the CPU; use backend='triton' for {device.type}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    with torch.device("meta"):
        model = model_cls(cfg)
    input_norm = cfg.quant.input_norm
    dd = dense_dtype if backend == "dense" else torch.float32

    pool: dict = {}

    def module(names: list[str]) -> PackedLinearModule:
        role = "|".join(n.rsplit(".", 1)[1] for n in names)
        return PackedLinearModule([linears[n] for n in names], backend, dd, input_norm=input_norm,
                                  buffers=pool, role=role, device=device)

    for i, blk in enumerate(model.layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        at, mlp = blk.self_attn, blk.mlp
        at.qkv_proj = module([a + "q_proj", a + "k_proj", a + "v_proj"])
        at.o_proj = module([a + "o_proj"])
        mlp.gate_up_proj = module([m + "gate_proj", m + "up_proj"])
        mlp.down_proj = module([m + "down_proj"])
        for n in ("q_proj", "k_proj", "v_proj"):
            delattr(at, n)
        for n in ("gate_proj", "up_proj"):
            delattr(mlp, n)
    emb = fp["embed_tokens.weight"]
    head_w = emb if cfg.tie_embeddings else fp["lm_head.weight"]
    if head == "auto":
        head = "f16" if head_w.dtype is torch.float16 else "fp32"
    model.embed_tokens = RuntimeEmbedding(emb.to(device))
    model.lm_head = RuntimeHead(head_w, head, dense_dtype if backend == "dense" else None, device)
    # what is left on the meta device: norm weights and the RoPE tables
    model.to_empty(device=device)
    own = dict(model.named_parameters())
    for name, p in own.items():
        if name not in fp:
            raise ValueError(f"packed model has no tensor {name}")
        p.copy_(fp[name].float())
        p.requires_grad_(False)
    model.reset_rope(max(max_len or 0, cfg.max_seq_len), device)
    return model.eval()
