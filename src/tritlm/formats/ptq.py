"""Post-training quantisation: a model's block Linear layers -> other kinds (absmean ternary, sign
binary, int8 per channel, int4 per group; int8 per-token activations), without any training.

PTQ to 1-2 bits loses a great deal: BitNet-style models reach full-precision quality because they
are *trained* through the quantiser. Expect perplexity to rise several-fold on a model trained in
full precision; use it as the starting point for a quantisation-aware fine-tune, not as a product.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tritlm.errors import ConfigError
from tritlm.model.config import QuantOverrides
from tritlm.model.transformer import Transformer
from tritlm.nn.bitlinear import BitLinear
from tritlm.quant.config import QuantConfig

log = logging.getLogger(__name__)

WARNING = ("post-training quantisation to {bits} without fine-tuning loses a lot of quality (perplexity "
           "typically rises several-fold); fine-tune with quantisation-aware training to recover it")


@torch.no_grad()
def effective_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The weight a Linear actually multiplies by: dequantised for a quantised BitLinear (what it
    was trained through), the weight itself for a full-precision one."""
    if isinstance(mod, BitLinear) and mod.config.quantised:
        return mod.effective_weight()
    return mod.weight.detach().float().clone()


@torch.no_grad()
def requantize(model: Transformer, quant: QuantConfig | None = None,
               overrides: QuantOverrides | None = None) -> Transformer:
    """A new model (eval mode) whose block Linears take new kinds: ``quant`` as the default (None:
    keep the model's) and ``overrides`` (None: keep the model's; ``()``: none).

    A layer whose kind does not change keeps its latent weights (the same model, bit for bit); a
    layer that changes kind is quantised from the weight it computed with before
    (:func:`effective_weight`), so a ternary-trained layer requantised to int8 starts from its
    ternary weights, and an FP model's layers from their float weights (plain absmean / absmax PTQ).
    """
    old = model.cfg
    cfg = old.replace(quant=quant if quant is not None else old.quant,
                      quant_overrides=old.quant_overrides if overrides is None else tuple(overrides))
    out = Transformer(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[0] not in set(old.linear_names())}
    missing, _ = out.load_state_dict(state, strict=False)
    linears = set(old.linear_names())
    if any(k.rsplit(".", 1)[0] not in linears for k in missing):
        raise ConfigError(f"requantize: tensors missing from the model: {missing[:3]}")
    changed = 0
    for name in old.linear_names():
        src, dst = model.get_submodule(name), out.get_submodule(name)
        same = old.quant_for(name) == cfg.quant_for(name)
        dst.weight.copy_(src.weight.detach() if same else effective_weight(src).to(dst.weight.dtype))
        changed += not same
    log.info("requantize: %d of %d block Linears changed kind", changed, len(linears))
    return out.eval()


def quantize_model(model: Transformer, bits: str = "ternary", act_bits: int | None = 8) -> Transformer:
    """A new model (eval mode) whose block Linear layers are ``bits`` (ternary, binary, int8, int4)
    BitLinears over ``model``'s weights: absmean / sign / absmax PTQ. The LM head and embeddings
    stay full precision."""
    if bits not in ("ternary", "binary", "int8", "int4"):
        raise ConfigError(f"bits must be ternary, binary, int8 or int4, not {bits!r}")
    out = requantize(model, QuantConfig(weight=bits, act_bits=act_bits), ())  # type: ignore[arg-type]
    if bits in ("ternary", "binary"):
        log.warning(WARNING.format(bits=bits))
    return out


def ptq_report(model: Transformer, tokenizer: Any, text: str, bits: str = "ternary",
               max_windows: int | None = 32) -> dict[str, Any]:
    """Quantise ``model`` and measure perplexity on held-out ``text`` before and after
    (:func:`tritlm.eval.perplexity.perplexity`, ``chunks`` protocol over the first ``max_windows``
    chunks of the model's context)."""
    from tritlm.eval.perplexity import perplexity

    ids = tokenizer.encode(text)
    q = quantize_model(model, bits)
    limit = max_windows * model.cfg.max_seq_len if max_windows else None
    before, after = (perplexity(m, ids, protocol="chunks", max_tokens=limit) for m in (model, q))
    return {"bits": bits, "ppl_fp": before.ppl, "ppl_quant": after.ppl, "ratio": after.ppl / before.ppl,
            "tokens": before.tokens, "model": q}
