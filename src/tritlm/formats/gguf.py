"""GGUF export/import for llama.cpp (TQ2_0, TQ1_0, Q8_0, Q4_0, F16) and bitnet.cpp (I2_S); see docs/formats.md.

Architecture: a model with SubLN and a SiLU-gated FFN is written as llama.cpp's ``bitnet`` arch
(``attn_sub_norm``, ``ffn_sub_norm``; llama.cpp's converter does not permute q/k for it), one with a
gated ReLU^2 FFN as bitnet.cpp's ``bitnet-b1.58`` (llama.cpp's bitnet graph is SiLU-gated: measured
with llama-cpp-python, see docs/formats.md); a model without SubLN as
``llama``, whose graph uses llama.cpp's interleaved ("NORM") RoPE, so q/k rows are permuted from HF's
rotate_half order exactly as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` does.

Block Linears, one GGUF type per tensor by the layer's kind (a mixed model mixes them), each written
from our integer levels and scales (no re-quantisation), so every kind is exact up to fp16 rounding of
its scales:

* ternary / binary -> ``qtype`` (TQ2_0 | TQ1_0; binary levels +-1 are ternary codes): blocks of 256
  weights of a row with one fp16 d; every block of a row takes the row's scale (per-tensor or
  per-channel). I2_S (bitnet.cpp; all-ternary/binary models with per-tensor scales only): 2-bit
  codes w + 1 in blocks of 128 (byte j of a 32-byte block holds weights j, j+32, j+64, j+96 in bits
  7:6, 5:4, 3:2, 1:0), then one f32 scale, padded to 32 bytes; type id 36 is bitnet.cpp's own and
  collides with upstream ggml, so such files load only in bitnet.cpp (and here).
* int8 -> Q8_0: 32-weight blocks {fp16 d = the row scale, the int8 levels as they are}.
* int4 -> Q4_0: 32-weight blocks {fp16 d = the scale of the group the block lies in, nibbles
  level + 8}; group sizes 32/64/128 are multiples of 32.
* fp -> ``fp_type`` (F16 | F32).

A row length K that is not a multiple of the type's block (256 for TQ, 128 for I2_S, 32 for Q8_0 /
Q4_0) cannot be blocked: that tensor alone falls back to F16 (levels x scale) and the file lists it in
``tritlm.fallback_f16``. ``qtype`` F16 / F32 writes every block Linear dequantised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritlm.errors import FormatError
from tritlm.formats.common import (
    block_linears,
    check_exportable,
    fp_tensors,
    set_linear,
)
from tritlm.formats.gguf_io import (
    F16,
    F32,
    I2_S,
    Q4_0,
    Q8_0,
    TQ1_0,
    TQ2_0,
    TYPE_NAMES,
    GGUFFile,
    read_gguf,
    write_gguf,
)
from tritlm.formats.gguf_tokenizer import tokenizer_from_kv, tokenizer_kv
from tritlm.formats.sanity import check_model_finite, check_tensor_index, state_shapes
from tritlm.io_atomic import atomic_path
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import FP, TERNARY, QuantConfig
from tritlm.quant.weights import dequantize, quantize_weight

log = logging.getLogger(__name__)

QTYPES = {"TQ2_0": TQ2_0, "TQ1_0": TQ1_0, "I2_S": I2_S, "F16": F16, "F32": F32}
HEAD_TYPES = {"F32": F32, "F16": F16, "Q8_0": Q8_0, "Q4_0": Q4_0}
# llama.cpp file types (LLAMA_FTYPE_*); 40 = MOSTLY_I2_S in bitnet.cpp's fork
_FTYPE = {TQ2_0: 37, TQ1_0: 36, I2_S: 40, F16: 1, F32: 0, Q8_0: 7, Q4_0: 2}
_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "attn_sub_norm": "attn_sub_norm", "ffn_sub_norm": "ffn_sub_norm"}


def gguf_name(name: str) -> str:
    """tritlm parameter name -> llama.cpp tensor name."""
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")  # layers.{i}.[self_attn|mlp.]{mod}.weight
    return f"blk.{parts[1]}.{_NAMES[parts[-2]]}.weight"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half rows -> llama.cpp interleaved rows (convert_hf_to_gguf ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- I2_S ---------------------------------------------------------------------------------------
def pack_i2s(q: np.ndarray, scale: float) -> bytes:
    """Levels [N, K] (N*K % 128 == 0) -> bitnet.cpp I2_S bytes: n/4 packed codes + f32 scale + pad."""
    codes = (q.reshape(-1, 4, 32).astype(np.uint8) + 1)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    packed = np.bitwise_or.reduce(codes << shifts, axis=1).astype(np.uint8)
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return packed.tobytes() + tail.tobytes()


def unpack_i2s(raw: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Inverse of :func:`pack_i2s`: (int8 levels [n], scale)."""
    packed = raw[: n // 4].reshape(-1, 1, 32)
    codes = (packed >> np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)) & 3
    if (codes == 3).any():
        raise FormatError("I2_S tensor holds the invalid 2-bit code 3")
    scale = float(np.frombuffer(raw[n // 4: n // 4 + 4].tobytes(), dtype="<f4")[0])
    return codes.reshape(-1).astype(np.int8) - 1, scale


# ---- export -------------------------------------------------------------------------------------
def _arch(cfg: ModelConfig) -> str:
    if cfg.qk_norm:
        raise FormatError("gguf: QK-norm is in neither llama.cpp's llama nor bitnet architecture")
    if cfg.sub_norm:
        if not cfg.tie_embeddings:
            log.warning("gguf: llama.cpp's bitnet arch expects tied embeddings; writing output.weight anyway")
        if cfg.mlp == "relu2":
            # Measured: llama.cpp's `bitnet` graph gates the FFN with SiLU (logits 9% off for a relu2
            # model). bitnet.cpp names its gated-ReLU^2 BitNet b1.58 2B4T graph "bitnet-b1.58"; upstream
            # llama.cpp refuses that name instead of running the model wrong.
            log.warning("gguf: a gated ReLU^2 model is written as arch 'bitnet-b1.58' (bitnet.cpp); upstream "
                        "llama.cpp's 'bitnet' graph is SiLU-gated and cannot run it")
            return "bitnet-b1.58"
        return "bitnet"
    if cfg.mlp != "swiglu":
        raise FormatError("gguf: a gated ReLU^2 FFN without SubLN fits no llama.cpp architecture")
    return "llama"


def _row_scales(scale: np.ndarray, n: int) -> np.ndarray:
    """A ternary / binary / int8 scale (per tensor or per row) as ``[n]`` float32."""
    s = np.asarray(scale, dtype=np.float32).reshape(-1)
    return np.broadcast_to(s, (n,)).copy() if s.size == 1 else s.reshape(n)


def _dequant(lv: np.ndarray, kind: str, scale: np.ndarray, group: int | None) -> np.ndarray:
    """float32 levels x scale for every kind (``scale`` as :func:`_model_layers` yields it)."""
    n, k = lv.shape
    if kind == "int4":
        s = np.repeat(scale.reshape(n, -1), group, axis=1)[:, :k]
    else:
        s = _row_scales(scale, n)[:, None]
    return lv.astype(np.float32) * s


def _model_layers(model: Transformer):
    """(name, kind, levels int8 or float weights [out, in], scale float32 or None, int4 group size) of
    every block Linear of a training model. ``scale``: ``[1]`` / ``[n]`` (ternary, binary), ``[n]``
    (int8), ``[n, groups]`` (int4), None (fp)."""
    cfg = model.cfg
    for lname in block_linears(cfg):
        q = cfg.quant_for(lname)
        mod = model.get_submodule(lname)
        if not q.quantised:
            yield lname, "fp", mod.weight.detach().float().cpu().numpy(), None, None
            continue
        lv, s = mod.quantized_weight()
        lv, s = lv.cpu().numpy().astype(np.int8), s.detach().float().cpu().numpy()
        n = lv.shape[0]
        s = s.reshape(n, -1) if q.weight == "int4" else s.reshape(-1)
        yield lname, q.weight, lv, s, (q.group_size if q.weight == "int4" else None)


def _packed_layers(pm):
    """:func:`_model_layers` for a :class:`~tritlm.formats.packed.PackedModel` (the same arrays)."""
    for lname in block_linears(pm.config):
        pl = pm.linears[lname]
        if pl.scale is None:
            yield lname, "fp", pl.weights.float().numpy(), None, None
        else:
            yield lname, pl.kind, pl.levels(), np.asarray(pl.scale, dtype=np.float32), pl.group_size


def export_gguf(model: Transformer, tokenizer: Any, path: str | Path, qtype: str = "TQ2_0",
                fp_type: str = "F32", name: str = "tritlm", head_type: str | None = None) -> Path:
    """Write ``model`` as GGUF v3. ``qtype``: the type of the ternary / binary Linears (TQ2_0 | TQ1_0 |
    I2_S), or F16 | F32 to write every block Linear dequantised (the only choice for a
    full-precision model). Mixed models: int8 Linears go to Q8_0, int4 to Q4_0, FP ones to
    ``fp_type``, exactly (see the module docstring). Other tensors take ``fp_type`` (``head_type``: the
    output matrix's own type, e.g. Q8_0 as llama.cpp's quantiser would pick)."""
    check_model_finite("gguf", model)
    fp = {k: v.float().cpu().numpy() for k, v in fp_tensors(model)}
    return _write(model.cfg, fp, _model_layers(model), tokenizer, path, qtype, fp_type, head_type, name)


def export_gguf_packed(pm, path: str | Path, qtype: str = "TQ2_0", fp_type: str = "F16",
                       head_type: str | None = None, name: str = "tritlm") -> Path:
    """:func:`export_gguf` straight from a :class:`~tritlm.formats.packed.PackedModel` (no float
    model is built; ``tritlm bench`` hands its random 700M model to llama.cpp this way). The same
    weights give the same file as :func:`export_gguf`."""
    fp = {k: v.float().numpy() for k, v in pm.fp.items()}
    return _write(pm.config, fp, _packed_layers(pm), pm.tokenizer, path, qtype, fp_type, head_type, name)


# ---- block encoders (from levels and scales; no re-quantisation) -------------------------------
def pack_blocks(lv: np.ndarray, d: np.ndarray, ttype: int) -> bytes:
    """int8 levels ``[n, k]`` and one scale per block ``d`` ``[n, k / block]`` -> the ggml blocks of
    ``ttype`` (Q8_0, Q4_0, TQ2_0, TQ1_0), bit for bit as ggml's reference quantisers lay them out
    (ggml-quants.c ``quantize_row_*_ref``); ``d`` is stored as fp16. Levels must already be in the
    type's range: [-127, 127] (Q8_0), [-8, 7] (Q4_0), {-1, 0, 1} (TQ)."""
    bs = {Q8_0: 32, Q4_0: 32, TQ2_0: 256, TQ1_0: 256}[ttype]
    n, k = lv.shape
    nb = n * (k // bs)
    blocks = np.ascontiguousarray(lv, dtype=np.int8).reshape(nb, bs)
    dh = np.ascontiguousarray(np.asarray(d, dtype=np.float32).reshape(nb, 1).astype("<f2")).view(np.uint8)
    if ttype == Q8_0:  # {fp16 d; int8 qs[32]}
        return np.concatenate([dh, blocks.view(np.uint8)], axis=1).tobytes()
    if ttype == Q4_0:  # {fp16 d; uint8 qs[16]}: byte j = (w[j] + 8) | (w[j + 16] + 8) << 4
        nib = (blocks.astype(np.int16) + 8).astype(np.uint8)
        return np.concatenate([dh, nib[:, :16] | (nib[:, 16:] << 4)], axis=1).tobytes()
    codes = (blocks.astype(np.int16) + 1).astype(np.uint8)  # -1, 0, 1 -> 0, 1, 2
    if ttype == TQ2_0:  # {uint8 qs[64]; fp16 d}: byte 32c + m holds w[128c + m + 32j] in bits 2j
        c = codes.reshape(nb, 2, 4, 32) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        qs = np.bitwise_or.reduce(c, axis=2).reshape(nb, 64)
        return np.concatenate([qs, dh], axis=1).tobytes()
    # TQ1_0 {uint8 qs[48]; uint8 qh[4]; fp16 d}: 5 trits per byte (the first most significant),
    # stored as ceil(v * 256 / 243); qh holds 4 trits, shifted up by one trit.
    c = codes.astype(np.uint16)
    w5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)
    qs0 = (c[:, :160].reshape(nb, 5, 32) * w5.reshape(1, 5, 1)).sum(axis=1)
    qs1 = (c[:, 160:240].reshape(nb, 5, 16) * w5.reshape(1, 5, 1)).sum(axis=1)
    qh = (c[:, 240:].reshape(nb, 4, 4) * w5[:4].reshape(1, 4, 1)).sum(axis=1)
    q = np.concatenate([qs0, qs1, qh], axis=1)
    q = ((q * 256 + 242) // 243).astype(np.uint8)
    return np.concatenate([q, dh], axis=1).tobytes()


def _block_scales(kind: str, scale: np.ndarray, n: int, k: int, bs: int, group: int | None) -> np.ndarray:
    """``[n, k / bs]``: every block of a row takes the row's scale, an int4 block its group's."""
    if kind == "int4":
        return np.repeat(scale.reshape(n, -1), group // bs, axis=1)[:, : k // bs]
    return np.repeat(_row_scales(scale, n)[:, None], k // bs, axis=1)


def _check_layers(cfg: ModelConfig, qt: int, qtype: str) -> None:
    for lname, q in cfg.layer_quants().items():
        if q.input_norm:
            raise FormatError(f"gguf: {lname} has a BitLinear input_norm; llama.cpp has no equivalent")
        if q.quantised and q.act_bits not in (8, None):
            raise FormatError(f"gguf: {lname} has act_bits={q.act_bits}; llama.cpp quantises activations to 8 bits")
        if qt == I2_S and (q.weight not in ("ternary", "binary") or q.scale != "tensor"):
            raise FormatError(f"gguf: I2_S holds ternary layers with one scale per tensor only, and {lname} is "
                              f"{q.kind}; use TQ2_0 or TQ1_0 for a mixed model")


def _write(cfg: ModelConfig, fp: dict[str, np.ndarray], layers, tokenizer: Any, path: str | Path, qtype: str,
           fp_type: str, head_type: str | None, name: str) -> Path:
    """fp: every non-block tensor by tritlm name (float32); layers: what :func:`_model_layers` yields
    for every block Linear."""
    from gguf.quants import quantize

    check_exportable(cfg, "gguf")
    for t, allowed in ((qtype, QTYPES), (fp_type, ("F16", "F32")), (head_type, (None, *HEAD_TYPES))):
        if t not in allowed:
            raise FormatError(f"gguf: type must be one of {', '.join(str(a) for a in allowed)}, not {t!r}")
    qt, ft = QTYPES[qtype], QTYPES[fp_type]
    if qt in (TQ2_0, TQ1_0, I2_S) and not cfg.quantised:
        raise FormatError(f"gguf: {qtype} needs a ternary/binary model; quantise it first (tritlm quantize)")
    _check_layers(cfg, qt, qtype)
    arch = _arch(cfg)
    npdt = np.float16 if ft == F16 else np.float32
    tensors: list[tuple[str, tuple[int, ...], int, bytes]] = []
    fallback: list[str] = []
    for k, a in fp.items():
        gname = gguf_name(k)
        if a.ndim == 2 and head_type is not None and gname == "output.weight":
            ht = HEAD_TYPES[head_type]
            raw = a.astype(np.float32).tobytes() if ht == F32 else (
                a.astype(np.float16).tobytes() if ht == F16 else quantize(a.astype(np.float32), ht).tobytes())
            tensors.append((gname, tuple(reversed(a.shape)), ht, raw))
            continue
        # norms stay F32 (llama.cpp requires it); big matrices take fp_type
        t = ft if a.ndim == 2 else F32
        raw = a.astype(npdt if t == F16 else np.float32).tobytes()
        tensors.append((gname, tuple(reversed(a.shape)), t, raw))
    weights_by_type: dict[int, int] = {}
    low_bit = False  # any ternary / binary layer
    for lname, kind, lv, s, group in layers:
        low_bit |= kind in ("ternary", "binary")
        short = lname.rsplit(".", 1)[1]
        if arch == "llama" and short in ("q_proj", "k_proj"):
            heads = cfg.n_heads if short == "q_proj" else cfg.kv_heads
            lv = _permute(lv, heads)
            if s is not None and s.shape[0] == lv.shape[0]:  # per-row / per-group scales move with their rows
                s = _permute(s, heads)
        n, kdim = lv.shape
        shape = (kdim, n)
        gname = gguf_name(lname + ".weight")
        bt = {"ternary": qt, "binary": qt, "int8": Q8_0, "int4": Q4_0}.get(kind)
        if qt in (F16, F32) or kind == "fp":
            t = qt if qt in (F16, F32) else ft
            w = lv if kind == "fp" else _dequant(lv, kind, s, group)
            raw = w.astype(np.float16 if t == F16 else np.float32).tobytes()
        elif bt == I2_S and kdim % 128 == 0:
            t, raw = I2_S, pack_i2s(lv, float(s.reshape(-1)[0]))
        elif bt in (TQ2_0, TQ1_0, Q8_0, Q4_0) and kdim % (bs := 256 if bt in (TQ2_0, TQ1_0) else 32) == 0:
            t, raw = bt, pack_blocks(lv, _block_scales(kind, s, n, kdim, bs, group), bt)
        else:  # rows that cannot be blocked
            t = F16
            fallback.append(gname)
            raw = _dequant(lv, kind, s, group).astype(np.float16).tobytes()
        tensors.append((gname, shape, t, raw))
        weights_by_type[t] = weights_by_type.get(t, 0) + n * kdim
    if fallback:
        log.warning("gguf: %d tensor(s) have rows not a multiple of their type's block (256 weights for TQ, 128 "
                    "for I2_S, 32 for Q8_0 / Q4_0) and are stored as F16, 16 bits a weight: %s", len(fallback),
                    ", ".join(fallback[:4]))
    # llama.cpp's file type: the chosen qtype when ternary / binary layers use it, else the type
    # holding most block-Linear weights
    ftype = _FTYPE[qt] if low_bit or qt in (F16, F32) or not weights_by_type else \
        _FTYPE[max(weights_by_type, key=weights_by_type.get)]
    kv: dict[str, Any] = {
        "general.architecture": arch, "general.name": name, "general.file_type": ftype,
        "general.quantization_version": 2,
        f"{arch}.vocab_size": cfg.vocab_size, f"{arch}.context_length": cfg.max_seq_len,
        f"{arch}.embedding_length": cfg.dim, f"{arch}.block_count": cfg.n_layers,
        f"{arch}.feed_forward_length": cfg.ffn_dim, f"{arch}.attention.head_count": cfg.n_heads,
        f"{arch}.attention.head_count_kv": cfg.kv_heads, f"{arch}.rope.freq_base": float(cfg.rope_theta),
        f"{arch}.rope.dimension_count": cfg.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        "tritlm.config": json.dumps(cfg.to_dict()), "tritlm.qtype": qtype,
        "tritlm.fallback_f16": fallback,
    }
    kv.update(tokenizer_kv(tokenizer, cfg.vocab_size))
    path = Path(path)
    with atomic_path(path) as tmp:
        write_gguf(tmp, kv, tensors)
    log.info("wrote %s (%s, %s, %d tensors)", path, arch, qtype, len(tensors))
    return path


# ---- import -------------------------------------------------------------------------------------
def dequantize_tensor(f: GGUFFile, t) -> np.ndarray:
    """float32 array in numpy order (reversed GGUF shape)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = f.tensor_bytes(t)
    shape = tuple(reversed(t.shape))
    if t.ttype == F32:
        return raw.view("<f4").reshape(shape).astype(np.float32)
    if t.ttype == F16:
        return raw.view("<f2").reshape(shape).astype(np.float32)
    if t.ttype in (TQ1_0, TQ2_0, Q8_0, Q4_0):
        return dequantize(raw, GGMLQuantizationType(t.ttype)).reshape(shape).astype(np.float32)
    if t.ttype == I2_S:
        q, s = unpack_i2s(raw, int(np.prod(shape)))
        return q.reshape(shape).astype(np.float32) * np.float32(s)
    raise FormatError(f"{f.path}: tensor {t.name} has unsupported type {t.type_name}")


def _latent(w: np.ndarray, q: QuantConfig, rtol: float) -> np.ndarray | None:
    """Latent weights W that the layer's quantiser (``q``) turns back into ``w`` (within ``rtol``
    of each weight), or None when ``w`` is not of that kind (e.g. a different scale per block).

    ternary / binary: every non-zero of the tensor (per-tensor scale) or of the row (per-channel)
    must have the same magnitude s; absmean ternary stores the non-zeros at s / f (f = the fraction
    of non-zeros, see :func:`tritlm.formats.common.latent_for`), binary and TWN at s. int8 / int4:
    ``w`` itself - absmax of levels x d is 127 d (7 d), so the quantiser gives back d and the levels.
    """
    if q.weight in ("ternary", "binary"):
        a = np.abs(w)
        ax = {"axis": -1, "keepdims": True} if q.scale == "channel" else {}
        s = a.max(**ax)
        if not ((a == 0) | (a == s)).all():
            return None
        lv = np.sign(w).astype(np.float32)
        if q.weight == "ternary" and q.dynamic_threshold is None:
            f = (lv != 0).mean(**ax)
            w_lat = lv * (s / np.maximum(f, 1e-30))
        else:
            w_lat = lv * s
    else:
        w_lat = w
    w_lat = np.ascontiguousarray(w_lat, dtype=np.float32)
    qq, ss = quantize_weight(torch.from_numpy(w_lat), q)
    back = dequantize(qq, ss, q.group_size if q.weight == "int4" else None).numpy()
    if not (np.abs(back - w) <= rtol * np.abs(w) + 1e-30).all():
        return None
    return w_lat


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The model config the file declares, checked against its tensor table (names and shapes)
    before anything of its size is built."""
    cfg = _declared_config(f)
    index = {t.name: tuple(reversed(t.shape)) for t in f.tensors}
    check_tensor_index(str(f.path), cfg, index, {gguf_name(k): s for k, s in state_shapes(cfg).items()})
    return cfg


def _declared_config(f: GGUFFile) -> ModelConfig:
    kv = f.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or arch not in ("llama", "bitnet", "bitnet-b1.58"):  # metadata of any type
        raise FormatError(f"{f.path}: architecture {str(arch)[:40]!r} is not supported (llama, bitnet, bitnet-b1.58)")
    if "tritlm.config" in kv:
        try:
            return ModelConfig.from_dict(json.loads(kv["tritlm.config"]))
        except Exception as e:  # noqa: BLE001 - fall back to the llama.cpp keys below
            log.warning("gguf: ignoring a bad tritlm.config (%s)", e)
    try:
        emb = f.by_name()["token_embd.weight"]
        # F32 / F16 / Q4_0 / Q8_0 files (llama.cpp's own quantisations) load as full precision
        quant = FP if kv.get("general.file_type") in (0, 1, 2, 7) else TERNARY
        return ModelConfig(
            vocab_size=int(emb.shape[1]), dim=int(kv[f"{arch}.embedding_length"]),
            n_layers=int(kv[f"{arch}.block_count"]), n_heads=int(kv[f"{arch}.attention.head_count"]),
            n_kv_heads=int(kv.get(f"{arch}.attention.head_count_kv", kv[f"{arch}.attention.head_count"])),
            ffn_dim=int(kv[f"{arch}.feed_forward_length"]),
            max_seq_len=min(int(kv.get(f"{arch}.context_length", 2048)), 8192),
            norm_eps=float(kv.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(kv.get(f"{arch}.rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in f.by_name(), sub_norm=arch != "llama",
            mlp="relu2" if arch == "bitnet-b1.58" else "swiglu", quant=quant)
    except KeyError as e:
        raise FormatError(f"{f.path}: missing metadata or tensor {e}") from None
    except Exception as e:  # noqa: BLE001 - ConfigError on impossible values
        raise FormatError(f"{f.path}: inconsistent model metadata ({e})") from None


def import_gguf(path: str | Path):
    """(Transformer in eval mode, tokenizer or None) from a GGUF file written by us or llama.cpp tools.

    Every block Linear loads as the kind the file's ``tritlm.config`` gives it (ternary / binary /
    int8 / int4 / fp) when its weights are of that kind - always for our own files; a layer whose
    weights are not (a file quantised by llama.cpp from floats: a different ``d`` per block) loads
    as a full-precision layer holding the exact dequantised weights."""
    f = read_gguf(path)
    cfg = config_from_gguf(f)
    arch = f.kv["general.architecture"]
    tensors = f.by_name()
    model = Transformer(cfg)
    linears = set(block_linears(cfg))
    weights: dict[str, np.ndarray] = {}  # block Linear -> latent weights (or dense ones)
    dense: list[str] = []  # quantised in cfg, not representable: loaded as FP
    with torch.no_grad():
        for k, v in model.state_dict().items():
            mod = k.rsplit(".", 1)[0]
            if k == "lm_head.weight" and cfg.tie_embeddings:
                continue
            g = gguf_name(k)
            t = tensors[g]  # present with this shape: config_from_gguf checked the table
            w = dequantize_tensor(f, t)
            if not np.isfinite(w).all():
                raise FormatError(f"{f.path}: {g} holds NaN or infinite values")
            short = mod.rsplit(".", 1)[-1]
            if arch == "llama" and short in ("q_proj", "k_proj"):
                w = _unpermute(w, cfg.n_heads if short == "q_proj" else cfg.kv_heads)
            if mod not in linears:
                v.copy_(torch.from_numpy(w))
                continue
            q = cfg.quant_for(mod)
            lat = _latent(w, q, 1e-5 if t.ttype not in (F16, F32) else 2e-3) if q.quantised else w
            if lat is None:
                dense.append(mod)
                lat = w
            weights[mod] = lat
    if dense:
        # Scales that tritlm's layers cannot hold (per-block d): those layers load as full precision, exactly.
        quantised = [n for n, q in cfg.layer_quants().items() if q.quantised]
        log.warning("gguf: %d of %d quantised layer(s) have scales their kind cannot hold (e.g. %s); loading "
                    "them as full precision", len(dense), len(quantised), dense[0])
        cfg2 = cfg.fp_twin() if len(dense) == len(quantised) else \
            cfg.replace(quant_overrides=tuple((n, FP) for n in dense) + cfg.quant_overrides)
        model2 = Transformer(cfg2)
        model2.load_state_dict(model.state_dict(), strict=False)
        model = model2
    for name, w in weights.items():
        set_linear(model, name, torch.from_numpy(w))
    model.eval()
    return model, tokenizer_from_kv(f.kv)


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():  # before opening: a FIFO or a device would block the open for ever
        return False
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


__all__ = ["export_gguf", "export_gguf_packed", "import_gguf", "is_gguf", "pack_i2s", "unpack_i2s", "TYPE_NAMES"]
