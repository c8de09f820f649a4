"""Metadata checked before it is trusted, and one policy for non-finite weights.

Every format declares its model (a ``config.json``, GGUF keys, a ``.1bit`` JSON header) apart from
its tensors. A loader compares the two with :func:`check_tensor_index` *before* it builds layers of
the declared size: every tensor the config implies must be in the file's index with that shape, so
the model built is as large as the file (the readers have already checked that each tensor's bytes
lie inside the file), never what a corrupt number asks for. The one size no tensor carries, the
context length, is bounded by the model's own size (:func:`check_context`).

Non-finite weights (NaN, inf) are refused wherever a model enters or leaves tritlm: every loader
and every writer raises a one-line :class:`FormatError` naming the tensor (:func:`check_finite`,
:func:`check_model_finite`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tritlm.errors import FormatError
from tritlm.model.config import ModelConfig

# RoPE-table entries (context x head dim) any model may have; beyond this, at most its parameters
ROPE_FLOOR = 1 << 22
Shape = tuple[int, ...]


def fp_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Names and shapes of the full-precision tensors of a model of ``cfg`` (embeddings, norms, an
    untied LM head): everything but the block Linears."""
    d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    out: dict[str, Shape] = {"embed_tokens.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        out[f"layers.{i}.input_layernorm.weight"] = (d,)
        out[f"layers.{i}.post_attention_layernorm.weight"] = (d,)
        if cfg.qk_norm:
            out[f"layers.{i}.self_attn.q_norm.weight"] = (hd,)
            out[f"layers.{i}.self_attn.k_norm.weight"] = (hd,)
        if cfg.sub_norm:
            out[f"layers.{i}.self_attn.attn_sub_norm.weight"] = (d,)
            out[f"layers.{i}.mlp.ffn_sub_norm.weight"] = (f,)
    return out


def state_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """The state dict a file of ``cfg`` stores (a tied LM head once, as the embedding), computed
    from the config alone: nothing is allocated."""
    out = fp_shapes(cfg)
    out.update({f"{n}.weight": s for n, s in cfg.linear_shapes().items()})
    return out


def check_tensor_index(where: str, cfg: ModelConfig, index: Mapping[str, Iterable[int]],
                       want: Mapping[str, Shape | frozenset[Shape]] | None = None) -> None:
    """Raise unless every tensor ``cfg`` implies is in ``index`` (name -> shape, as the file's
    table / header gives it) with that shape; then :func:`check_context`.

    ``want`` defaults to :func:`state_shapes`; a format with other names or layouts passes its
    own, a value being one shape or a set of the shapes it may be stored in."""
    want = state_shapes(cfg) if want is None else want
    for name, shape in want.items():
        got = index.get(name)
        if got is None:
            need = shape if isinstance(shape, tuple) else min(shape)
            raise FormatError(f"{where}: tensor {name} is missing (the model config needs {list(need)}; "
                              f"{len(index)} tensors in the file)")
        got = tuple(int(x) for x in got)
        ok = got == shape if isinstance(shape, tuple) else got in shape
        if not ok:
            need = list(shape) if isinstance(shape, tuple) else " or ".join(str(list(s)) for s in sorted(shape))
            raise FormatError(f"{where}: {name} has shape {list(got)}, the model config needs {need}")
    check_context(where, cfg)


def check_context(where: str, cfg: ModelConfig) -> None:
    """The context length sizes the RoPE tables (context x head dim) and no tensor of the file:
    bounded by the larger of :data:`ROPE_FLOOR` and the model's parameter count."""
    params = sum(_numel(s) for s in state_shapes(cfg).values())
    rope = cfg.max_seq_len * cfg.head_dim
    if rope > max(ROPE_FLOOR, params):
        raise FormatError(f"{where}: a context of {cfg.max_seq_len} tokens is implausible for a model of "
                          f"{params:,} parameters (RoPE tables of {rope:,} entries)")


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_finite(where: str, name: str, t: Any) -> None:
    """Raise unless the tensor / array ``t`` holds finite values only (integer data always does)."""
    import numpy as np
    import torch

    if isinstance(t, torch.Tensor):
        bad = t.is_floating_point() and not bool(torch.isfinite(t).all())
    else:
        a = np.asarray(t)
        bad = a.dtype.kind == "f" and not bool(np.isfinite(a).all())
    if bad:
        raise FormatError(f"{where}: {name} holds NaN or infinite values")


def check_model_finite(where: str, model: Any) -> None:
    """:func:`check_finite` on every parameter of a model (before it is written or packed)."""
    for name, p in model.state_dict().items():
        check_finite(where, name, p)
