"""Decoder-only transformer: RoPE, GQA, SwiGLU / gated ReLU^2, RMSNorm, optional QK-norm and SubLN.

Every block Linear is built by :func:`tritlm.nn.make_linear` from the per-layer kind the config
gives its name (``ModelConfig.quant_for``): quantisation lives in BitLinear, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tritlm.model.config import ModelConfig
from tritlm.model.kv_cache import KVCache
from tritlm.nn.linear import make_linear, share_act_slot
from tritlm.nn.rmsnorm import RMSNorm, SubNorm


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)  # Hugging Face "rotate_half" layout
    return emb.cos().float(), emb.sin().float()


def _has_enable_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try it
        return False


_GQA = _has_enable_gqa()


def _attention(q, k, v, mask, rep: int) -> torch.Tensor:
    """SDPA with causal masking when ``mask`` is None (queries and keys end together), else the mask."""
    t = q.shape[2]
    causal = mask is None and t > 1
    if rep > 1:
        if _GQA:  # torch >= 2.5 reads the shared kv heads in place
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, D]; cos/sin: [T, 1, D] (positions shared by the batch) or [B, T, 1, D] (per row)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        p = f"layers.{layer}.self_attn."
        self.q_proj = make_linear(cfg.dim, cfg.n_heads * self.hd, cfg.quant_for(p + "q_proj"))
        self.k_proj = make_linear(cfg.dim, self.n_kv * self.hd, cfg.quant_for(p + "k_proj"))
        self.v_proj = make_linear(cfg.dim, self.n_kv * self.hd, cfg.quant_for(p + "v_proj"))
        self.o_proj = make_linear(cfg.n_heads * self.hd, cfg.dim, cfg.quant_for(p + "o_proj"))
        share_act_slot(self.q_proj, self.k_proj, self.v_proj)  # one input: quantised once
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.attn_sub_norm = SubNorm(cfg.dim, cfg.norm_eps) if cfg.sub_norm else None
        self.qkv_proj: nn.Module | None = None  # set by the runtime conversion in place of q/k/v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        nq, nkv = H * hd, KV * hd
        # [b, t, heads, hd] until attention: norms and RoPE run on contiguous rows
        if self.qkv_proj is not None:  # the runtime's row-fused q|k|v (convert_for_runtime)
            qkv = self.qkv_proj(x)
            qk = qkv[..., :nq + nkv].view(b, t, H + KV, hd)
            v = qkv[..., nq + nkv:].view(b, t, KV, hd)
            if self.q_norm is not None:
                qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
            qk = apply_rope(qk, cos, sin)  # q and k in one pass
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q = self.q_proj(x).view(b, t, H, hd)
            k = self.k_proj(x).view(b, t, KV, hd)
            v = self.v_proj(x).view(b, t, KV, hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if cache is not None:
            # the cache returns every key/value the new tokens see, and the mask when they see a
            # prefix (None: plain causal attention over the returned keys)
            k, v, mask = cache.update(self.layer, k, v)
        y = _attention(q, k, v, mask, self.n_heads // self.n_kv)
        y = y.transpose(1, 2).reshape(b, t, nq)
        if self.attn_sub_norm is not None:
            y = self.attn_sub_norm(y)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        p = f"layers.{layer}.mlp."
        self.kind = cfg.mlp
        self.gate_proj = make_linear(cfg.dim, cfg.ffn_dim, cfg.quant_for(p + "gate_proj"))
        self.up_proj = make_linear(cfg.dim, cfg.ffn_dim, cfg.quant_for(p + "up_proj"))
        self.down_proj = make_linear(cfg.ffn_dim, cfg.dim, cfg.quant_for(p + "down_proj"))
        share_act_slot(self.gate_proj, self.up_proj)
        self.ffn_sub_norm = SubNorm(cfg.ffn_dim, cfg.norm_eps) if cfg.sub_norm else None
        self.gate_up_proj: nn.Module | None = None  # set by the runtime conversion in place of gate/up
        self.ffn = cfg.ffn_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gu = self.gate_up_proj(x)
            g, u = gu[..., :self.ffn], gu[..., self.ffn:]
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        g = F.silu(g) if self.kind == "swiglu" else F.relu(g).square()
        # without autograd the product goes into silu's fresh output: one [T, ffn] pass less
        h = g * u if torch.is_grad_enabled() else g.mul_(u)
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, layer)
        self.rs = cfg.residual_scale

    def forward(self, x, cos, sin, cache=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache)
        x = x + (a if self.rs == 1.0 else self.rs * a)  # no pass over the stream for a scale of 1
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (m if self.rs == 1.0 else self.rs * m)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_rope(self, max_len: int, device: torch.device | str = "cpu") -> None:
        """(Re)compute the RoPE tables for ``max_len`` positions (after a build on the meta device)."""
        cos, sin = rope_tables(self.cfg.head_dim, max_len, self.cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # GPT-2: residual output projections scaled down with depth.
        resid_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, 0.0, s)

    def new_cache(self, batch: int = 1, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, batch, c.kv_heads, max_len or c.max_seq_len, c.head_dim, dtype,
                       self.embed_tokens.weight.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, last_only: bool = False,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = idx.shape
        pos = cache.positions(b, t) if cache is not None else None
        if pos is None:  # from 0: training and full-sequence evaluation
            if t > self.rope_cos.shape[0]:
                raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        else:
            # a static (CUDA-graph) cache keeps its positions on the device, checked by its owner
            if not getattr(cache, "static", False) and int(pos.max()) >= self.rope_cos.shape[0]:
                raise ValueError(f"sequence of {int(pos.max()) + 1} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [T, D], or [B, T, D]: a position per row
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.advance(t)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, label_smoothing=label_smoothing)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B, as in nanoGPT's estimate_mfu)."""
        c = self.cfg
        n = self.num_params(exclude_embeddings=not c.tie_embeddings)
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
