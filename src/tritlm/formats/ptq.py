"""Post-training quantisation: a full-precision model's Linear layers -> BitLinear (absmean ternary or
sign binary, per-tensor scale; int8 per-token activations), without any training.

PTQ to 1-2 bits loses a great deal: BitNet-style models reach full-precision quality because they
are *trained* through the quantiser. Expect perplexity to rise several-fold on a model trained in
full precision; use it as the starting point for a quantisation-aware fine-tune, not as a product.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from tritlm.errors import ConfigError
from tritlm.model.transformer import Transformer
from tritlm.quant.config import QuantConfig

log = logging.getLogger(__name__)

WARNING = ("post-training quantisation to {bits} without fine-tuning loses a lot of quality (perplexity "
           "typically rises several-fold); fine-tune with quantisation-aware training to recover it")


def quantize_model(model: Transformer, bits: str = "ternary", act_bits: int | None = 8) -> Transformer:
    """A new model (eval mode) whose block Linear layers are BitLinear over ``model``'s weights.

    The latent weights are the original ones, so BitLinear's forward is exactly absmean PTQ:
    W_q = clip(round(W / (mean|W| + eps)), -1, 1) * mean|W| (ternary) or sign(W) * mean|W| (binary).
    The LM head and embeddings stay full precision.
    """
    if bits not in ("ternary", "binary"):
        raise ConfigError(f"bits must be 'ternary' or 'binary', not {bits!r}")
    cfg = model.cfg.replace(quant=QuantConfig(weight=bits, act_bits=act_bits))  # type: ignore[arg-type]
    out = Transformer(cfg)
    out.load_state_dict(model.state_dict())
    log.warning(WARNING.format(bits=bits))
    return out.eval()


@torch.no_grad()
def perplexity(model: Transformer, ids: list[int] | torch.Tensor, max_windows: int | None = None) -> float:
    """exp(mean next-token loss) over consecutive non-overlapping windows of the model's context."""
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = model.cfg.max_seq_len
    if t.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    total, count = 0.0, 0
    for w, start in enumerate(range(0, t.numel() - 1, n)):
        if max_windows is not None and w >= max_windows:
            break
        x = t[start:start + n + 1]
        if x.numel() < 2:
            break
        logits, _ = model(x[:-1][None])
        loss = torch.nn.functional.cross_entropy(logits[0].float(), x[1:], reduction="sum")
        total += float(loss)
        count += x.numel() - 1
    return math.exp(total / count)


def ptq_report(model: Transformer, tokenizer: Any, text: str, bits: str = "ternary",
               max_windows: int | None = 32) -> dict[str, Any]:
    """Quantise ``model`` and measure perplexity on held-out ``text`` before and after."""
    ids = tokenizer.encode(text)
    q = quantize_model(model, bits)
    before, after = perplexity(model, ids, max_windows), perplexity(q, ids, max_windows)
    return {"bits": bits, "ppl_fp": before, "ppl_quant": after, "ratio": after / before,
            "tokens": min(len(ids), (max_windows or 10 ** 12) * model.cfg.max_seq_len), "model": q}
