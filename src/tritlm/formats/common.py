"""Helpers shared by the interchange formats (HF, GGUF, .1bit): weight extraction, the latent-weight
trick that makes a BitLinear reproduce a stored (q, scale) exactly. (``atomic_path`` is
:func:`tritlm.io_atomic.atomic_path`, re-exported.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from tritlm.errors import FormatError
from tritlm.io_atomic import atomic_path  # noqa: F401 - re-exported; defined once there
from tritlm.model.config import ModelConfig

log = logging.getLogger(__name__)



def block_linears(cfg: ModelConfig) -> list[str]:
    """Names (without ``.weight``) of every Linear inside the blocks, e.g. ``layers.0.mlp.up_proj``."""
    return cfg.linear_names()


FP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def fp_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """State-dict entries that are not block Linears (embeddings, norms, an untied LM head): what
    every format stores in full precision. A tied LM head is the embedding and is skipped."""
    linears = set(block_linears(model.cfg))
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] in linears or (k == "lm_head.weight" and model.cfg.tie_embeddings):
            continue
        yield k, v.detach()


def check_exportable(cfg: ModelConfig, fmt: str) -> None:
    """Refuse the options no external format represents, with the reason, instead of writing a
    file that other tools would run differently."""
    if cfg.residual_scale != 1.0:
        raise FormatError(f"{fmt}: residual_scale={cfg.residual_scale} has no equivalent in this format")
    q = cfg.quant
    if q.input_norm and fmt != "hf":
        raise FormatError(f"{fmt}: BitLinear input_norm has no equivalent in this format")
    if q.quantised and q.act_bits not in (8, None):
        raise FormatError(f"{fmt}: act_bits={q.act_bits}; only 8-bit activations are supported by other runtimes")


@torch.no_grad()
def quantised_linear(model: nn.Module, name: str) -> tuple[torch.Tensor, float]:
    """(int8 levels [out, in], scale) of a quantised Linear of ``model``."""
    mod = model.get_submodule(name)
    if not hasattr(mod, "quantized_weight"):
        raise FormatError(f"{name} is not a quantised layer")
    q, s = mod.quantized_weight()
    return q, float(s)


@torch.no_grad()
def latent_for(q: torch.Tensor, scale: float, weight: str = "ternary", eps: float = 1e-5) -> torch.Tensor:
    """Latent float weights W such that BitLinear's quantiser gives back exactly ``q`` and ``scale``.

    BitLinear re-quantises its latent weights every forward: q = clip(round(W / (mean|W| + eps))) and
    scale = mean|W|. Storing W = q * scale would shrink the scale by the fraction of non-zeros f, so
    the non-zeros are stored at ``scale / f``: mean|W| is then ``scale`` and |W| / (scale + eps) =
    scale / (f (scale + eps)) >= 1 - eps/scale rounds to 1 (f <= 1). For binary weights f = 1.
    """
    qf = q.float()
    nz = int((q != 0).sum())
    if nz == 0:
        return torch.zeros_like(qf)
    f = nz / q.numel()
    if weight == "binary":
        return qf * scale
    return qf * (scale / f)


def set_linear(model: nn.Module, name: str, w: torch.Tensor) -> None:
    mod = model.get_submodule(name)
    if tuple(mod.weight.shape) != tuple(w.shape):
        raise FormatError(f"{name}: shape {tuple(w.shape)} does not match the model's {tuple(mod.weight.shape)}")
    with torch.no_grad():
        mod.weight.copy_(w.to(mod.weight.dtype))


def set_quantised(model: nn.Module, name: str, q: torch.Tensor, scale: float) -> None:
    """Load stored levels + scale into a BitLinear (via :func:`latent_for`), or q * scale into an FP Linear."""
    mod = model.get_submodule(name)
    cfg = getattr(mod, "config", None)
    if cfg is not None and cfg.quantised:
        set_linear(model, name, latent_for(q, scale, cfg.weight, cfg.eps))
    else:
        set_linear(model, name, q.float() * scale)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the logit comparison used by the tests and ``validate``."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
