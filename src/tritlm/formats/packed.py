"""Packed ternary model folders: what the CPU runtime (``tritlm.infer.engine``) loads.

A packed folder holds

* ``model.safetensors`` - for every ternary Linear ``<name>`` of the blocks: ``<name>.qweight``
  (uint8, the kernel layout ``i2s_r4`` of :func:`tritlm.kernels.pack.pack_ternary_kernel`, shape
  ``[n_padded/4, k_padded/128, 4, 32]``, i.e. 2 bits per weight) and ``<name>.scale`` (float32
  ``[1]``: W ~= q * scale); the full-precision parts (embeddings, RMSNorm weights, lm_head) in
  fp16 (default) or fp32;
* ``config.json`` - ``{"format": "tritlm-packed", "version": 1, "model": ModelConfig dict,
  "fp_dtype": ..., "shapes": {name: [n, k]}}``;
* ``tokenizer/`` - the tokenizer, as ``Tokenizer.save`` writes it (optional for synthetic models).

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place, so
a crash never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritlm.errors import FormatError
from tritlm.formats.common import FP_DTYPES, block_linears, fp_tensors
from tritlm.kernels.pack import PackedTernary, pack_ternary_kernel
from tritlm.model.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT = "tritlm-packed"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"

def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every block Linear."""
    return cfg.linear_shapes()


@dataclass
class PackedModel:
    """A packed model in memory: ternary matrices in kernel layout + full-precision tensors."""

    config: ModelConfig
    linears: dict[str, tuple[PackedTernary, float]]  # name -> (packed weights, scale)
    fp: dict[str, torch.Tensor]  # embed_tokens.weight, norm weights, lm_head.weight (if untied)
    tokenizer: Any = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the packed ternary weights, their scales and the full-precision parts."""
        tern = sum(p.nbytes for p, _ in self.linears.values())
        return {"ternary": tern, "scales": 4 * len(self.linears),
                "fp": sum(t.numel() * t.element_size() for t in self.fp.values())}

    def ternary_params(self) -> int:
        return sum(p.n * p.k for p, _ in self.linears.values())


# --------------------------------------------------------------------------- building
def from_transformer(model: torch.nn.Module, tokenizer: Any = None, fp_dtype: str = "fp16") -> PackedModel:
    """Pack a (trained) :class:`~tritlm.model.transformer.Transformer` whose Linears are ternary BitLinears."""
    cfg: ModelConfig = model.cfg
    if cfg.quant.weight != "ternary":
        raise FormatError(f"only ternary models can be packed (quant.weight = {cfg.quant.weight!r})")
    if cfg.quant.act_bits != 8:
        raise FormatError(f"the CPU runtime needs 8-bit activations (quant.act_bits = {cfg.quant.act_bits})")
    mods = dict(model.named_modules())
    linears = {}
    for name in block_linears(cfg):
        q, s = mods[name].quantized_weight()
        linears[name] = (pack_ternary_kernel(q.numpy()), float(s))
    dt = FP_DTYPES[fp_dtype]
    # Norm weights are tiny and sensitive: always float32.
    fp = {name: t.to(torch.float32 if "norm" in name else dt).contiguous().clone()
          for name, t in fp_tensors(model)}
    return PackedModel(cfg, linears, fp, tokenizer, meta={"fp_dtype": fp_dtype})


def random_packed(cfg: ModelConfig, seed: int = 0, fp_dtype: str = "fp16", zero_frac: float = 0.35) -> PackedModel:
    """A packed model with random ternary weights, built straight from int8 (no float model).

    Scales follow init_std so activations stay in a sane range; used by ``tritlm bench``.
    """
    rng = np.random.default_rng(seed)
    linears = {}
    for name, (n, k) in linear_shapes(cfg).items():
        # Draw 2-bit codes directly (0, 1, 2 = -1, 0, +1) with ~zero_frac zeros, as trained BitNets.
        u = rng.random((n, k), dtype=np.float32)
        w = np.where(u < zero_frac, 0, np.where(u < (1 + zero_frac) / 2, -1, 1)).astype(np.int8)
        linears[name] = (pack_ternary_kernel(w), float(cfg.init_std * 1.2))
    dt = FP_DTYPES[fp_dtype]
    g = torch.Generator().manual_seed(seed)
    fp: dict[str, torch.Tensor] = {
        "embed_tokens.weight": (torch.randn(cfg.vocab_size, cfg.dim, generator=g) * cfg.init_std).to(dt),
        "norm.weight": torch.ones(cfg.dim),
    }
    if not cfg.tie_embeddings:
        fp["lm_head.weight"] = (torch.randn(cfg.vocab_size, cfg.dim, generator=g) * cfg.init_std).to(dt)
    for i in range(cfg.n_layers):
        fp[f"layers.{i}.input_layernorm.weight"] = torch.ones(cfg.dim)
        fp[f"layers.{i}.post_attention_layernorm.weight"] = torch.ones(cfg.dim)
        if cfg.qk_norm:
            fp[f"layers.{i}.self_attn.q_norm.weight"] = torch.ones(cfg.head_dim)
            fp[f"layers.{i}.self_attn.k_norm.weight"] = torch.ones(cfg.head_dim)
        if cfg.sub_norm:
            fp[f"layers.{i}.self_attn.attn_sub_norm.weight"] = torch.ones(cfg.dim)
            fp[f"layers.{i}.mlp.ffn_sub_norm.weight"] = torch.ones(cfg.ffn_dim)
    return PackedModel(cfg, linears, fp, None, meta={"fp_dtype": fp_dtype, "random": True})


# --------------------------------------------------------------------------- save / load
def save_packed(pm: PackedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``pm`` to the folder ``out`` atomically (temp folder + rename)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FormatError(f"{out} exists; choose another output folder (or pass overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        shapes = {}
        for name, (p, s) in pm.linears.items():
            if p.layout != "i2s_r4":
                p = pack_ternary_kernel(p.unpack())
            tensors[f"{name}.qweight"] = torch.from_numpy(np.ascontiguousarray(p.data))
            tensors[f"{name}.scale"] = torch.tensor([s], dtype=torch.float32)
            shapes[name] = [p.n, p.k]
        tensors.update({k: v.contiguous() for k, v in pm.fp.items()})
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        cfg = {"format": FORMAT, "version": VERSION, "model": pm.config.to_dict(),
               "fp_dtype": pm.meta.get("fp_dtype", "fp16"), "shapes": shapes,
               "bytes": pm.weight_bytes(), "ternary_params": pm.ternary_params()}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        if pm.tokenizer is not None:
            pm.tokenizer.save(tmp / TOKENIZER_DIR)
        for f in tmp.rglob("*"):  # durable before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("packed model written to %s", out)
    return out


def is_packed(path: str | Path) -> bool:
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not (p.is_dir() and cfg.is_file() and (p / WEIGHTS_FILE).is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_packed(path: str | Path, load_tokenizer: bool = True) -> PackedModel:
    """Read a packed folder written by :func:`save_packed`."""
    from safetensors.torch import load_file

    p = Path(path)
    if not is_packed(p):
        raise FormatError(f"{p} is not a tritlm packed model folder")
    meta = json.loads((p / CONFIG_FILE).read_text())
    if meta.get("version", 0) > VERSION:
        raise FormatError(f"{p}: packed format version {meta['version']} is newer than this tritlm ({VERSION})")
    cfg = ModelConfig.from_dict(meta["model"])
    tensors = load_file(str(p / WEIGHTS_FILE))
    linears = {}
    for name, (n, k) in meta["shapes"].items():
        try:
            data = tensors.pop(f"{name}.qweight").numpy()
            scale = float(tensors.pop(f"{name}.scale")[0])
        except KeyError:
            raise FormatError(f"{p}: tensor {name}.qweight/.scale missing") from None
        kp = -(-k // 128) * 128
        if data.shape != (-(-n // 4), kp // 128, 4, 32):
            raise FormatError(f"{p}: {name}.qweight has shape {tuple(data.shape)}, expected for [{n}, {k}]")
        linears[name] = (PackedTernary(data=data, n=n, k=k, k_padded=kp), scale)
    want = set(block_linears(cfg))
    if set(linears) != want:
        raise FormatError(f"{p}: ternary layers missing: {sorted(want - set(linears))[:3]}")
    tok = None
    if load_tokenizer and (p / TOKENIZER_DIR).exists():
        from tritlm.data import load_tokenizer as _lt

        tok = _lt(p / TOKENIZER_DIR)
    return PackedModel(cfg, linears, tensors, tok, p, meta={"fp_dtype": meta.get("fp_dtype")})


def pack_checkpoint(checkpoint: str | Path, out: str | Path, fp_dtype: str = "fp16",
                    overwrite: bool = False) -> tuple[Path, dict]:
    """``tritlm pack``: a training checkpoint -> packed folder. Returns (folder, size report)."""
    from tritlm.formats.native import load_native

    model, tok, _ = load_native(checkpoint)
    pm = from_transformer(model, tok, fp_dtype)
    path = save_packed(pm, out, overwrite=overwrite)
    return path, size_report(pm, path)


def size_report(pm: PackedModel, path: Path | None = None) -> dict:
    """Weight bytes vs the ideal 2 bits x ternary params + FP parts (padding makes up the rest)."""
    b = pm.weight_bytes()
    ideal = pm.ternary_params() / 4 + b["fp"]
    actual = b["ternary"] + b["scales"] + b["fp"]
    rep = {"ternary_params": pm.ternary_params(), "ternary_bytes": b["ternary"], "fp_bytes": b["fp"],
           "weight_bytes": actual, "ideal_bytes": int(ideal), "overhead_pct": 100.0 * (actual / ideal - 1)}
    if path is not None:
        rep["file_bytes"] = (Path(path) / WEIGHTS_FILE).stat().st_size
    return rep
