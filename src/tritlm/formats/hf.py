"""Hugging Face transformers checkpoints: BitNet (packed ternary) and Llama-family export/import.

What we write (checked against transformers' ``integrations/bitnet.py`` and ``models/bitnet``):

* a quantised tritlm model with SubLN -> ``BitNetForCausalLM`` (``model_type: "bitnet"``; BitNet
  always has ``attn_sub_norm``/``ffn_sub_norm``; ``hidden_act`` relu2 or silu);
* a quantised model without SubLN -> ``LlamaForCausalLM`` with the same ``bitnet``
  ``quantization_config`` (transformers' BitNet quantiser swaps every nn.Linear but the listed
  ``modules_to_not_convert``, whatever the architecture);
* a full-precision model -> ``LlamaForCausalLM`` (or ``BitNetForCausalLM`` without a quantization
  config when it has SubLN).

Quantised Linear weights: ``linear_class="autobitlinear"``, ``quantization_mode="offline"`` (default):
``weight`` uint8 ``[out/4, in]``, bits 2i..2i+1 of ``packed[r, c]`` = ``W[i*out/4 + r, c] + 1``, and
``weight_scale`` float ``[1]`` = mean|W| that *multiplies* the output. transformers only unpacks
when ``4 * rows == out_features``, so a layer whose ``out`` is not a multiple of 4 is stored
unpacked (levels -1/0/1 as floats), which its loader passes through unchanged.
``linear_class="bitlinear"`` (the class of microsoft/bitnet-b1.58-2B-4T) *divides* by
``weight_scale``, so it stores 1 / mean|W|; it needs ``out % 4 == 0``.

The tokenizer is written as ``tokenizer.json`` (a ``tokenizers`` file: HF tokenizers as they are;
char and byte tokenizers converted exactly, see :func:`to_hf_tokenizer`) or ``tokenizer.model``
(SentencePiece); tritlm's own copy goes to ``tritlm_tokenizer/`` so that import gives back the very
same tokenizer (same fingerprint). ``config.json`` also carries ``tritlm_config`` (our ModelConfig)
so that a round trip restores options transformers has no field for (binary weights, eps...).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritlm.errors import FormatError, TritlmError
from tritlm.formats.common import (
    FP_DTYPES,
    block_linears,
    check_exportable,
    fp_tensors,
    quantised_linear,
    set_linear,
    set_quantised,
)
from tritlm.formats.hf_tokenizer import load_hf_folder_tokenizer, save_hf_tokenizer, to_hf_tokenizer
from tritlm.formats.sanity import check_finite, check_model_finite, check_tensor_index, fp_shapes
from tritlm.io_atomic import atomic_path
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import FP, QuantConfig
from tritlm.safe_json import read_json

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ---- the packed layout ----------------------------------------------------------------------------
def pack_hf(q: torch.Tensor) -> torch.Tensor:
    """int8 levels [out, in] (out % 4 == 0) -> uint8 [out/4, in] in transformers' BitNet layout."""
    out = q.shape[0]
    if out % 4:
        raise ValueError(f"out_features {out} is not a multiple of 4")
    r = out // 4
    c = (q.to(torch.int16) + 1).to(torch.uint8)
    return c[:r] | (c[r:2 * r] << 2) | (c[2 * r:3 * r] << 4) | (c[3 * r:] << 6)


def unpack_hf(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_hf`: uint8 [R, in] -> int8 [4R, in]; code 3 is invalid."""
    parts = [((p >> (2 * i)) & 3) for i in range(4)]
    codes = torch.cat(parts, dim=0)
    if bool((codes == 3).any()):
        raise FormatError("packed BitNet weights contain the invalid 2-bit code 3")
    return codes.to(torch.int8) - 1


# ---- export -------------------------------------------------------------------------------------
def _check_kinds(cfg: ModelConfig) -> None:
    """transformers' BitNet layers are ternary with one scale per tensor (binary levels +-1 are
    ternary codes too), and one quantization_config covers every block Linear: refuse a mixed model
    (int8 / int4 / per-channel / FP layers in a quantised model, or per-layer activation settings)
    naming its first offending layer."""
    if not cfg.quant_overrides and (not cfg.quantised or cfg.quant.weight in ("ternary", "binary")) \
            and cfg.quant.scale == "tensor":
        return
    for name, q in cfg.layer_quants().items():
        if cfg.quantised and (q.weight not in ("ternary", "binary") or q.scale != "tensor"):
            raise FormatError(f"hf: {name} is {q.kind}; transformers' BitNet checkpoints hold ternary layers "
                              "only - export GGUF instead")
        if (q.act_bits, q.input_norm) != (cfg.quant.act_bits, cfg.quant.input_norm):
            raise FormatError(f"hf: {name} has act_bits={q.act_bits}, input_norm={q.input_norm}, unlike the model "
                              "default; transformers' BitNet config holds one setting - export GGUF instead")


def hf_config(cfg: ModelConfig, linear_class: str = "autobitlinear", dtype: torch.dtype = torch.float32,
              tokenizer: Any = None) -> dict[str, Any]:
    """config.json for ``cfg`` (see the module docstring for the architecture choice)."""
    check_exportable(cfg, "hf")
    _check_kinds(cfg)
    if cfg.qk_norm:
        raise FormatError("hf: QK-norm is in neither BitNetForCausalLM nor LlamaForCausalLM")
    q = cfg.quant
    if not q.quantised and q.act_bits is not None:
        raise FormatError("hf: full-precision weights with quantised activations have no HF equivalent")
    if q.quantised and q.act_bits != 8:
        raise FormatError("hf: transformers' BitLinear always quantises activations to int8")
    bitnet = cfg.sub_norm
    d: dict[str, Any] = {
        "architectures": ["BitNetForCausalLM" if bitnet else "LlamaForCausalLM"],
        "model_type": "bitnet" if bitnet else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "relu2" if cfg.mlp == "relu2" else "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 rope_parameters (and converts rope_theta).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": getattr(tokenizer, "eos_id", None),
        "tritlm_config": cfg.to_dict(),
    }
    if q.quantised:
        if linear_class not in ("autobitlinear", "bitlinear"):
            raise FormatError(f"hf: linear_class must be autobitlinear or bitlinear, not {linear_class!r}")
        d["quantization_config"] = {
            "quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline",
            "modules_to_not_convert": ["lm_head"], "use_rms_norm": bool(q.input_norm),
            # tritlm's BitLinear input norm is RMSNorm(affine=False) with its default eps.
            "rms_norm_eps": 1e-6,
        }
    return d


@torch.no_grad()
def hf_state_dict(model: Transformer, linear_class: str = "autobitlinear",
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd: dict[str, torch.Tensor] = {}
    for k, v in fp_tensors(model):
        hk = k if k.startswith("lm_head.") else f"model.{k}"
        sd[hk] = v.to(dtype).contiguous().clone()
    for name in sorted(block_linears(cfg)):
        hk = f"model.{name}"
        if not cfg.quantised:
            sd[f"{hk}.weight"] = model.get_submodule(name).weight.detach().to(dtype).contiguous().clone()
            continue
        q, s = quantised_linear(model, name)
        out = q.shape[0]
        if linear_class == "bitlinear":
            if out % 4:
                raise FormatError(f"hf: {name} has {out} outputs; linear_class='bitlinear' needs a multiple "
                                  "of 4 (use autobitlinear)")
            sd[f"{hk}.weight"] = pack_hf(q)
            sd[f"{hk}.weight_scale"] = torch.tensor([1.0 / s], dtype=dtype)
        else:
            sd[f"{hk}.weight"] = pack_hf(q) if out % 4 == 0 else q.to(dtype)
            sd[f"{hk}.weight_scale"] = torch.tensor([s], dtype=dtype)
        if cfg.quant.input_norm:
            sd[f"{hk}.rms_norm.weight"] = torch.ones(q.shape[1], dtype=dtype)
    return sd


def export_hf(model: Transformer, tokenizer: Any, out_dir: str | Path, *, linear_class: str = "autobitlinear",
              dtype: str = "fp32") -> Path:
    """Write a transformers checkpoint folder (config.json, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    if dtype not in FP_DTYPES:
        raise FormatError(f"hf: dtype must be one of {', '.join(FP_DTYPES)}, not {dtype!r}")
    td = FP_DTYPES[dtype]
    cfg = model.cfg
    check_model_finite("hf", model)
    conf = hf_config(cfg, linear_class, td, tokenizer)
    sd = hf_state_dict(model, linear_class, td)
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": conf["bos_token_id"], "eos_token_id": conf["eos_token_id"]}, indent=2) + "\n")
        save_hf_tokenizer(tokenizer, tmp)
    log.info("wrote %s (%s, %d tensors)", out_dir, conf["architectures"][0], len(sd))
    return out_dir


# ---- import -------------------------------------------------------------------------------------
def is_hf(path: str | Path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    try:
        d = read_json(p / "config.json")
    except FormatError:
        return False
    return isinstance(d, dict) and ("model_type" in d or "architectures" in d)


def _read_tensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files: list[Path]
    index = p / "model.safetensors.index.json"
    if (p / "model.safetensors").is_file():
        files = [p / "model.safetensors"]
    elif index.is_file():
        try:
            wm = read_json(index)["weight_map"]
            files = [p / f for f in sorted(set(wm.values()))]
        except (FormatError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index} is not a valid safetensors index ({e})") from None
    else:
        raise FormatError(f"{p}: no model.safetensors (PyTorch .bin checkpoints are not read; convert them "
                          "to safetensors first)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    return sd


def _rope_theta(d: dict[str, Any]) -> float:
    rp = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if isinstance(rp, dict):
        if rp.get("rope_type", "default") != "default":
            raise FormatError(f"hf: rope_type {rp.get('rope_type')!r} (RoPE scaling) is not supported")
        return float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    if scaling:
        raise FormatError(f"hf: rope_scaling {scaling!r} is not supported")
    return float(d.get("rope_theta", 10000.0))


def config_from_hf(d: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any] | None]:
    """(ModelConfig, quantization_config or None) from a config.json dict."""
    mt = d.get("model_type")
    if mt not in ("bitnet", "llama", "mistral"):
        raise FormatError(f"hf: model_type {mt!r} is not supported (bitnet, llama, mistral)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise FormatError("hf: attention/MLP biases are not supported")
    if mt == "mistral" and d.get("sliding_window") not in (None, 0):
        log.warning("hf: mistral sliding_window=%s is ignored (full attention)", d.get("sliding_window"))
    act = d.get("hidden_act", "relu2" if mt == "bitnet" else "silu")
    if act not in ("silu", "relu2"):
        raise FormatError(f"hf: hidden_act {act!r} is not supported (silu, relu2)")
    qc = d.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise FormatError(f"hf: quantization_config must be an object, got {type(qc).__name__}")
    if qc is not None and qc.get("quant_method") != "bitnet":
        raise FormatError(f"hf: quantization method {qc.get('quant_method')!r} is not supported (bitnet)")
    try:
        dim, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        hd = d.get("head_dim")
        if hd is not None and int(hd) != dim // heads:
            raise FormatError(f"hf: head_dim {hd} != hidden_size / num_attention_heads ({dim // heads})")
        quant = FP
        if qc is not None:
            quant = QuantConfig(weight="ternary", act_bits=8, input_norm=bool(qc.get("use_rms_norm")))
        cfg = ModelConfig(
            vocab_size=int(d["vocab_size"]), dim=dim, n_layers=int(d["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(d.get("num_key_value_heads") or heads), ffn_dim=int(d["intermediate_size"]),
            max_seq_len=int(d.get("max_position_embeddings", 2048)), mlp="relu2" if act == "relu2" else "swiglu",
            norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(d),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)), sub_norm=mt == "bitnet", quant=quant)
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as e:  # int(inf); 0 heads
        raise FormatError(f"hf: config.json lacks or has a bad {e}") from None
    except TritlmError as e:  # ConfigError: impossible sizes
        raise FormatError(f"hf: config.json describes an impossible model ({e})") from None
    ours = d.get("tritlm_config")
    if isinstance(ours, dict):
        # Our own export: restore what transformers has no field for (binary weights, eps...), but
        # only if it describes the same shapes: a hand-edited config.json wins.
        try:
            mine = ModelConfig.from_dict(ours)
            keys = ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "mlp", "sub_norm",
                    "tie_embeddings", "quantised")
            if all(getattr(mine, k) == getattr(cfg, k) for k in keys):
                cfg = mine
        except Exception as e:  # noqa: BLE001 - a foreign or edited field: keep the HF reading
            log.warning("hf: ignoring tritlm_config (%s)", e)
    return cfg, qc


def import_hf(path: str | Path, *, load_tokenizer_too: bool = True):
    """(Transformer in eval mode, tokenizer or None) from a transformers checkpoint folder.

    BitNet offline weights (packed uint8 or unpacked levels) with their ``weight_scale`` become
    BitLinear layers that reproduce q * scale exactly; ``online`` checkpoints hold latent bf16/fp32
    weights, quantised here with transformers' own formula (see :func:`_online_quant`).
    """
    p = Path(path)
    d = read_json(p / "config.json")
    if not isinstance(d, dict):
        raise FormatError(f"{p}/config.json is not a JSON object")
    cfg, qc = config_from_hf(d)
    sd = _read_tensors(p)
    _check_sizes(p, cfg, sd, qc is not None)
    model = Transformer(cfg)
    online = qc is not None and qc.get("quantization_mode") == "online"
    divides = qc is not None and qc.get("linear_class", "bitlinear") == "bitlinear"
    linears = set(block_linears(cfg))
    used: set[str] = set()

    def take(k: str) -> torch.Tensor:
        if k not in sd:
            raise FormatError(f"{p}: tensor {k} is missing")
        used.add(k)
        return sd[k]

    with torch.no_grad():
        for k, v in model.state_dict().items():
            mod_name = k.rsplit(".", 1)[0]
            if mod_name in linears or (k == "lm_head.weight" and cfg.tie_embeddings):
                continue
            hk = k if k.startswith("lm_head.") else f"model.{k}"
            t = take(hk)
            check_finite(str(p), hk, t)
            v.copy_(t.to(v.dtype))
        for name in sorted(linears):
            hk = f"model.{name}"
            w = take(f"{hk}.weight")
            mod = model.get_submodule(name)
            out, inp = mod.weight.shape
            check_finite(str(p), f"{hk}.weight", w)
            if qc is None or online:
                if qc is None:
                    set_linear(model, name, w.float())
                else:
                    set_quantised(model, name, *_online_quant(w))
                continue
            if w.dtype == torch.uint8 and w.shape[0] * 4 == out and w.shape[1] == inp:
                q = unpack_hf(w)
            elif tuple(w.shape) == (out, inp) and w.is_floating_point():
                q = w.float()
                if not bool(((q == -1) | (q == 0) | (q == 1)).all()):
                    raise FormatError(f"{p}: {hk}.weight is unpacked but not in {{-1, 0, 1}}")
                q = q.to(torch.int8)
            else:
                raise FormatError(f"{p}: {hk}.weight has shape {tuple(w.shape)} / {w.dtype}, expected packed "
                                  f"uint8 {(out // 4, inp)} or levels {(out, inp)}")
            s = float(take(f"{hk}.weight_scale").float().reshape(-1)[0])
            if divides:
                if s == 0:
                    raise FormatError(f"{p}: {hk}.weight_scale is 0 (bitlinear divides by it)")
                s = 1.0 / s
            if not np.isfinite(s):
                raise FormatError(f"{p}: {hk}.weight_scale is not finite")
            set_quantised(model, name, q, s)
            if cfg.quant.input_norm:
                take(f"{hk}.rms_norm.weight")  # always ones in what we accept: tritlm's input norm has none
    extra = sorted(set(sd) - used - {"lm_head.weight"} - {k for k in sd if k.endswith("rotary_emb.inv_freq")})
    if extra:
        log.warning("hf: %d tensor(s) not used, e.g. %s", len(extra), extra[:3])
    model.eval()
    tok = None
    if load_tokenizer_too:
        tok = load_hf_folder_tokenizer(p)
    return model, tok


def _check_sizes(p: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], quantised: bool) -> None:
    """The config must describe the tensors before a model of its size is allocated (a corrupt
    config.json could otherwise ask for gigabytes). Quantised Linears may be packed ``[out/4, in]``."""
    want: dict[str, Any] = {(k if k.startswith("lm_head.") else f"model.{k}"): s for k, s in fp_shapes(cfg).items()}
    for name, (n, k) in cfg.linear_shapes().items():
        want[f"model.{name}.weight"] = frozenset({(n, k), (n // 4, k)} if quantised and n % 4 == 0 else {(n, k)})
    check_tensor_index(str(p), cfg, {k: v.shape for k, v in sd.items()}, want)


def _online_quant(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """transformers' WeightQuant, exactly: s = 1 / max(mean|W|, 1e-5); q = clip(round(W * s)); the
    weight is q / s. Quantised here once, in its arithmetic, because tritlm's quantiser divides by
    mean|W| + 1e-5, which moves the rounding boundary by eps/mean|W| (~1e-3 for std-0.02 weights) and
    flips a few weights per matrix."""
    wf = w.float()
    s = 1.0 / wf.abs().mean().clamp(min=1e-5)
    q = (wf * s).round().clamp(-1, 1).to(torch.int8)
    return q, float(1.0 / s)


__all__ = ["export_hf", "import_hf", "is_hf", "pack_hf", "unpack_hf", "to_hf_tokenizer", "save_hf_tokenizer"]
