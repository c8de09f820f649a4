"""Fine-tuning an existing full-precision model into a quantised one: source, student, teacher, loss.

The student is the source architecture with its block Linears quantised per the spec (default:
every block Linear ternary; embeddings, norms and the head stay full precision), initialised with
the source weights. Gradual quantisation (lambda, see ``train/schedule.lam_at``) starts it at
exactly the source function; SubLN, when inserted, is blended in with the same lambda. The
optional teacher is the frozen source itself: it holds no gradients and no optimizer state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tritlm.errors import ConfigError
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.nn.rmsnorm import SubNorm
from tritlm.train.config import FinetuneConfig, TrainConfig

log = logging.getLogger(__name__)

# What makes the source's weights fit: a fine-tune may change how layers are quantised (and add
# SubLN), never the shapes or the function of the full-precision parts.
ARCH_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "mlp", "norm_eps",
             "rope_theta", "qk_norm", "residual_scale", "tie_embeddings")


def load_source(path: str) -> tuple[Transformer, Any]:
    """The source model (float32, eval mode, no gradients) and its tokenizer, from any file or
    folder ``tritlm`` rebuilds as floats (transformers folder, checkpoint, GGUF, .1bit)."""
    from tritlm.formats.detect import load_transformer

    model, tok, kind = load_transformer(path)
    if tok is None:
        raise ConfigError(f"finetune: {path} has no tokenizer (tokenizer.json or tokenizer.model); the "
                          "student must tokenize exactly like its source")
    if model.cfg.quantised:
        log.warning("finetune: %s (%s) is already quantised; the student starts from its dequantised "
                    "weights", path, kind)
    model = model.float().eval().requires_grad_(False)
    return model, tok


def student_config(src: ModelConfig, cfg: TrainConfig) -> ModelConfig:
    """The source architecture with the run's quantisation (``cfg.model``: ``quant`` and
    ``quant_overrides``; default every block Linear ternary) and SubLN when asked."""
    d = src.to_dict()
    d.pop("quant_overrides")
    d["quant"] = {}  # the default QuantConfig: ternary absmean weights, int8 activations
    for k, v in cfg.model.items():
        if k in ARCH_KEYS and v != d.get(k):
            raise ConfigError(f"finetune: model.{k}={v!r} differs from the source's {d.get(k)!r}; a fine-tune "
                              "keeps the source architecture")
        d[k] = v
    d["sub_norm"] = bool(src.sub_norm or cfg.finetune.sub_norm)
    d["max_seq_len"] = max(src.max_seq_len, cfg.block_size)
    student = ModelConfig.from_dict(d)
    if not student.quantised:
        raise ConfigError("finetune: the spec leaves every block Linear in full precision; nothing to fine-tune")
    return student


@torch.no_grad()
def init_student(student: Transformer, source: Transformer, inserted_sub_norm: bool) -> None:
    """Copy every source weight into the student; inserted SubLN norms are the only new tensors."""
    missing, unexpected = student.load_state_dict(source.state_dict(), strict=False)
    new = [k for k in missing if not k.endswith(("attn_sub_norm.weight", "ffn_sub_norm.weight"))]
    if new or unexpected:
        raise ConfigError(f"finetune: the source does not fit the student (missing {new[:3]}, "
                          f"unexpected {unexpected[:3]})")
    if inserted_sub_norm:
        for m in student.modules():
            if isinstance(m, SubNorm):
                m.inserted = True


def _sub_norm_inputs(model: Transformer) -> Iterator[tuple[str, nn.Module]]:
    for i, layer in enumerate(model.layers):
        yield f"layers.{i}.self_attn.attn_sub_norm", layer.self_attn.o_proj
        yield f"layers.{i}.mlp.ffn_sub_norm", layer.mlp.down_proj


@torch.no_grad()
def fit_sub_norm_gains(student: Transformer, source: Transformer, batches: list[torch.Tensor]) -> dict[str, float]:
    """Set each inserted SubLN gain g (per channel) to the least-squares fit of ``g * x / rms(x) ~ x``
    over the inputs of o_proj / down_proj in the source on ``batches``, so that the fully blended
    norm (lambda = 1) changes the source's function as little as one gain per channel can.
    Returns the relative residual of each fit (0 = the norm reproduces its input exactly)."""
    stats: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, lin in _sub_norm_inputs(source):
        norm = student.get_submodule(name)

        def pre(_m, args, name=name, eps=norm.eps):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            s = stats.setdefault(name, [torch.zeros(x.shape[-1], dtype=torch.float64) for _ in range(3)])
            s[0] += (x * n).sum(0).double()
            s[1] += (n * n).sum(0).double()
            s[2] += (x * x).sum(0).double()
        hooks.append(lin.register_forward_pre_hook(pre))
    try:
        for x in batches:
            source(x)
    finally:
        for h in hooks:
            h.remove()
    resid = {}
    for name, (xn, nn_, xx) in stats.items():
        g = xn / nn_.clamp_min(1e-30)
        student.get_submodule(name).weight.copy_(g.float())
        # sum (x - g n)^2 = xx - 2 g xn + g^2 nn = xx - g xn at the optimum
        resid[name] = float(((xx - g * xn).sum() / xx.sum().clamp_min(1e-30)).clamp_min(0).sqrt())
    return resid


class Distiller:
    """loss = CE + alpha * tau^2 * KL(teacher || student) + beta * normalised hidden-state MSE.

    Hidden states are each block's output, read with forward hooks (the forward pass stays the
    one every runtime shares). KL and MSE are means over tokens.
    """

    def __init__(self, teacher: Transformer, fc: FinetuneConfig, student: Transformer):
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.tau, self.beta = fc.distill_alpha, fc.distill_tau, fc.hidden_mse
        self._s: list[torch.Tensor] = []
        self._t: list[torch.Tensor] = []
        self._on = False  # record only inside __call__ (not during evaluation)
        if self.beta > 0:
            for layer in student.layers:
                layer.register_forward_hook(lambda _m, _a, out: self._s.append(out) if self._on else None)
            for layer in teacher.layers:
                layer.register_forward_hook(lambda _m, _a, out: self._t.append(out) if self._on else None)

    def __call__(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
        self._s.clear()
        self._t.clear()
        self._on = True
        try:
            logits, ce = student(x, y, label_smoothing=label_smoothing)
            with torch.no_grad():
                t_logits, _ = self.teacher(x)
        finally:
            self._on = False
        loss = ce
        if self.alpha > 0:
            loss = loss + self.alpha * kl_teacher_student(t_logits, logits, self.tau)
        if self.beta > 0:
            loss = loss + self.beta * normalised_mse(self._t, self._s)
        self._s.clear()
        self._t.clear()
        return loss


def kl_teacher_student(t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean over tokens of KL(softmax(t / tau) || softmax(s / tau)) (Hinton et al.'s scaling,
    so the gradient's size does not depend on tau)."""
    v = s_logits.shape[-1]
    s = F.log_softmax(s_logits.float().reshape(-1, v) / tau, dim=-1)
    t = F.log_softmax(t_logits.float().reshape(-1, v) / tau, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * tau * tau


def normalised_mse(teacher_h: list[torch.Tensor], student_h: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of ||h_t / |h_t| - h_s / |h_s| ||^2 (OneBit)."""
    if len(teacher_h) != len(student_h) or not teacher_h:
        raise RuntimeError(f"hidden states: {len(teacher_h)} teacher vs {len(student_h)} student layers")
    terms = [(F.normalize(s.float(), dim=-1) - F.normalize(t.float(), dim=-1)).pow(2).sum(-1).mean()
             for t, s in zip(teacher_h, student_h)]
    return torch.stack(terms).mean()


def teacher_dtype(fc: FinetuneConfig, device: torch.device) -> torch.dtype:
    if fc.teacher_dtype == "bfloat16" or (fc.teacher_dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32
