"""Packed model folders: what the CPU runtime (``tritlm.infer.engine``) loads.

A packed folder holds

* ``model.safetensors`` - for every block Linear ``<name>``: a quantised kind stores
  ``<name>.qweight`` (its kernel layout, see :mod:`tritlm.nn.packed_linear`: ternary ``i2s_r4``
  2 bits, binary ``b1_k128`` 1 bit, int8 ``i8_k32``, int4 ``i4_k64``) and ``<name>.scale``
  (float32: ``[1]`` per tensor, ``[n]`` per row, ``[n, groups]`` per int4 group); an FP kind stores
  ``<name>.weight`` (fp16 or fp32). Then the other full-precision parts (embeddings, RMSNorm
  weights, lm_head) in fp16 (default) or fp32;
* ``config.json`` - ``{"format": "tritlm-packed", "version": 2, "model": ModelConfig dict (with its
  per-layer ``quant_overrides``), "fp_dtype": ..., "tensors": {name: {kind, bits, layout, shape,
  scale_shape, group_size}}}``. Version 1 folders (every Linear ternary, ``"shapes": {name:
  [n, k]}``) still load;
* ``tokenizer/`` - the tokenizer, as ``Tokenizer.save`` writes it (optional for synthetic models).

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place, so
a crash never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from tritlm.errors import ConfigError, FormatError
from tritlm.formats.common import FP_DTYPES, block_linears, fp_tensors
from tritlm.formats.sanity import check_context, check_model_finite, fp_shapes
from tritlm.io_atomic import atomic_path, fsync_tree
from tritlm.kernels.pack import PackedBase3, PackedTernary, pack_ternary_kernel
from tritlm.kernels.pack_rows import PackedBinary, PackedInt4, PackedInt8
from tritlm.model.config import ModelConfig
from tritlm.nn.packed_linear import PackedLinear, pack_levels, pack_module
from tritlm.safe_json import read_json

log = logging.getLogger(__name__)

FORMAT = "tritlm-packed"
VERSION = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every block Linear."""
    return cfg.linear_shapes()


@dataclass
class PackedModel:
    """A packed model in memory: one :class:`PackedLinear` per block Linear + full-precision tensors."""

    config: ModelConfig
    linears: dict[str, PackedLinear]
    fp: dict[str, torch.Tensor]  # embed_tokens.weight, norm weights, lm_head.weight (if untied)
    tokenizer: Any = None
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the quantised Linears (levels + scales), the FP Linears and the other FP parts."""
        q = [p for p in self.linears.values() if p.scale is not None]
        return {"quantised": sum(p.weights.nbytes for p in q), "scales": sum(4 * p.scale.size for p in q),
                "fp_linears": sum(p.nbytes for p in self.linears.values() if p.scale is None),
                "fp": sum(t.numel() * t.element_size() for t in self.fp.values())}

    def ternary_params(self) -> int:
        """Weights of the low-bit (non-FP) Linears."""
        return sum(p.n * p.k for p in self.linears.values() if p.scale is not None)

    def kinds(self) -> dict[str, str]:
        """``{name: kind}`` of every block Linear."""
        return {n: p.kind for n, p in self.linears.items()}


def _check_runtime_config(cfg: ModelConfig) -> None:
    """What the packed runtime can run: 8-bit activations on quantised layers, plain FP layers, one
    input-norm setting for the whole model."""
    for name, q in cfg.layer_quants().items():
        if q.quantised and q.act_bits != 8:
            raise FormatError(f"{name}: the CPU runtime needs 8-bit activations (act_bits = {q.act_bits})")
        if not q.quantised and q.act_bits is not None:
            raise FormatError(f"{name}: an fp layer with {q.act_bits}-bit activations has no packed form")
        if q.input_norm != cfg.quant.input_norm:
            raise FormatError(f"{name}: input_norm differs from the model default; the runtime needs one setting")


# --------------------------------------------------------------------------- building
def from_transformer(model: torch.nn.Module, tokenizer: Any = None, fp_dtype: str = "fp16",
                     ternary_layout: str = "i2s") -> PackedModel:
    """Pack a (trained) :class:`~tritlm.model.transformer.Transformer`: every block Linear in the
    kind its config gives it (ternary, binary, int8, int4, or FP in ``fp_dtype``); ternary layers
    in ``ternary_layout`` (``i2s``: 2 bits, the kernels' layout; ``base3``: 1.6 bits stored,
    unpacked when the runtime loads it)."""
    cfg: ModelConfig = model.cfg
    if fp_dtype not in FP_DTYPES:
        raise FormatError(f"fp_dtype must be one of {', '.join(FP_DTYPES)}, got {fp_dtype!r}")
    _check_runtime_config(cfg)
    check_model_finite("pack", model)
    if ternary_layout not in ("i2s", "base3"):
        raise FormatError(f"ternary_layout must be 'i2s' or 'base3', got {ternary_layout!r}")
    linears = {name: pack_module(model.get_submodule(name), fp_dtype, ternary_layout) for name in block_linears(cfg)}
    dt = FP_DTYPES[fp_dtype]
    # Norm weights are tiny and sensitive: always float32.
    fp = {name: t.to(torch.float32 if "norm" in name else dt).contiguous().clone()
          for name, t in fp_tensors(model)}
    return PackedModel(cfg, linears, fp, tokenizer, meta={"fp_dtype": fp_dtype})


def _random_levels(rng: np.random.Generator, kind: str, n: int, k: int, zero_frac: float) -> np.ndarray:
    u = rng.random((n, k), dtype=np.float32)
    if kind == "ternary":  # codes with ~zero_frac zeros, as trained BitNets
        return np.where(u < zero_frac, 0, np.where(u < (1 + zero_frac) / 2, -1, 1)).astype(np.int8)
    if kind == "binary":
        return np.where(u < 0.5, -1, 1).astype(np.int8)
    top = 127 if kind == "int8" else 7
    return np.clip(np.rint(rng.standard_normal((n, k)) * top / 3), -top, top).astype(np.int8)


def random_packed(cfg: ModelConfig, seed: int = 0, fp_dtype: str = "fp16", zero_frac: float = 0.35) -> PackedModel:
    """A packed model with random weights in each layer's kind, built straight from integer levels
    (no float model). Scales follow init_std so activations stay in a sane range; ``tritlm bench``."""
    rng = np.random.default_rng(seed)
    dt = FP_DTYPES[fp_dtype]
    g = torch.Generator().manual_seed(seed)
    linears = {}
    for name, (n, k) in linear_shapes(cfg).items():
        q = cfg.quant_for(name)
        if not q.quantised:
            linears[name] = PackedLinear("fp16" if fp_dtype == "fp16" else "fp32",
                                         (torch.randn(n, k, generator=g) * cfg.init_std).to(dt))
            continue
        lv = _random_levels(rng, q.weight, n, k, zero_frac)
        rms = {"ternary": np.sqrt(1 - zero_frac), "binary": 1.0}.get(q.weight, (127 if q.weight == "int8" else 7) / 3)
        s = cfg.init_std * 1.2 * np.sqrt(1 - zero_frac) / rms  # the same weight RMS for every kind
        shape = (n, -(-k // q.group_size)) if q.weight == "int4" else ((n,) if q.per_channel else (1,))
        linears[name] = pack_levels(lv, np.full(shape, s, np.float32), q)
    # matrices (embeddings, head) random at init_std, norm weights 1
    fp = {name: (torch.randn(*shape, generator=g) * cfg.init_std).to(dt) if len(shape) == 2 else torch.ones(shape)
          for name, shape in fp_shapes(cfg).items()}
    return PackedModel(cfg, linears, fp, None, meta={"fp_dtype": fp_dtype, "random": True})


# --------------------------------------------------------------------------- save / load
def save_packed(pm: PackedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``pm`` to the folder ``out`` atomically (temp folder + fsync + rename)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FormatError(f"{out} exists; choose another output folder or pass overwrite=True "
                          "(--force on the command line)")
    tensors: dict[str, torch.Tensor] = {}
    records = {}
    for name, pl in pm.linears.items():
        if pl.kind == "ternary" and pl.weights.layout not in ("i2s_r4", "base3"):
            pl = PackedLinear("ternary", pack_ternary_kernel(pl.levels()), pl.scale)
        if pl.scale is None:
            tensors[f"{name}.weight"] = pl.weights.contiguous()
        else:
            tensors[f"{name}.qweight"] = torch.from_numpy(np.ascontiguousarray(pl.weights.data))
            tensors[f"{name}.scale"] = torch.from_numpy(np.ascontiguousarray(pl.scale))
        records[name] = pl.describe()
    tensors.update({k: v.contiguous() for k, v in pm.fp.items()})
    cfg = {"format": FORMAT, "version": VERSION, "model": pm.config.to_dict(),
           "fp_dtype": pm.meta.get("fp_dtype", "fp16"), "tensors": records,
           "bytes": pm.weight_bytes(), "ternary_params": pm.ternary_params()}
    with atomic_path(out, is_dir=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        if pm.tokenizer is not None:
            pm.tokenizer.save(tmp / TOKENIZER_DIR)
        fsync_tree(tmp)
    log.info("packed model written to %s", out)
    return out


def is_packed(path: str | Path) -> bool:
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not (p.is_dir() and cfg.is_file() and (p / WEIGHTS_FILE).is_file()):
        return False
    try:
        meta = read_json(cfg)
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except FormatError:
        return False


def inspect_packed(path: str | Path) -> dict:
    """What a packed folder holds, from its ``config.json`` (no weights read): format version, the
    model config, per-tensor kind / bits / layout / shape / bytes, and the totals by kind."""
    p = Path(path)
    if not is_packed(p):
        raise FormatError(f"{p} is not a tritlm packed model folder")
    meta = read_json(p / CONFIG_FILE)
    try:
        cfg = ModelConfig.from_dict(meta.get("model", {}))
        records = meta.get("tensors")
        if not isinstance(records, dict):  # version 1: all ternary, one scale per tensor
            records = {n: {"kind": "ternary", "bits": 2, "layout": "i2s_r4", "shape": s, "scale_shape": [1],
                           "group_size": None} for n, s in (meta.get("shapes") or {}).items()}
        kinds: dict[str, dict[str, int]] = {}
        for r in records.values():
            e = kinds.setdefault(str(r.get("kind")), {"tensors": 0, "params": 0})
            e["tensors"] += 1
            n, k = r.get("shape", [0, 0])
            e["params"] += int(n) * int(k)
    except (AttributeError, TypeError, ValueError, OverflowError, ConfigError) as e:  # hand-edited records
        raise FormatError(f"{p}/{CONFIG_FILE}: corrupt model or tensor records ({str(e)[:100]})") from None
    return {"path": str(p), "format": FORMAT, "version": meta.get("version"), "fp_dtype": meta.get("fp_dtype"),
            "model": {k: v for k, v in cfg.to_dict().items() if k != "quant_overrides"},
            "quant_overrides": cfg.to_dict()["quant_overrides"], "kinds": kinds, "bytes": meta.get("bytes"),
            "file_bytes": (p / WEIGHTS_FILE).stat().st_size, "tensors": records}


def _expected_qweight(kind: str, n: int, k: int, layout: str | None = None) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``<name>.qweight`` in each kind's layout."""
    if kind == "ternary" and layout == "base3":
        return (n, -(-k // 5)), torch.uint8
    if kind == "ternary":
        return (-(-n // 4), -(-k // 128), 4, 32), torch.uint8
    if kind == "int8":
        return (n, -(-k // 32) * 32), torch.int8
    if kind == "int4":
        return (n, -(-k // 64) * 32), torch.uint8
    if kind == "binary":
        return (n, -(-k // 128) * 16), torch.uint8
    raise FormatError(f"unknown packed kind {kind!r}")


def _read_linear(p: Path, tensors: dict, name: str, rec: dict, want: tuple[int, int]) -> PackedLinear:
    if not isinstance(rec, dict):
        raise FormatError(f"{p}: tensor record of {name} is not a mapping")
    kind, shape = rec.get("kind"), rec.get("shape")
    if not isinstance(shape, list) or shape != list(want):
        raise FormatError(f"{p}: {name} has shape {shape}, the model config says {list(want)}")
    n, k = want
    if kind in ("fp16", "fp32"):
        w = tensors.pop(f"{name}.weight", None)
        dt = torch.float16 if kind == "fp16" else torch.float32
        if w is None or tuple(w.shape) != (n, k) or w.dtype != dt:
            raise FormatError(f"{p}: {name}.weight missing or not {kind} [{n}, {k}]")
        if not bool(torch.isfinite(w).all()):
            raise FormatError(f"{p}: {name}.weight holds NaN or infinite values")
        return PackedLinear(kind, w)
    data, scale = tensors.pop(f"{name}.qweight", None), tensors.pop(f"{name}.scale", None)
    if data is None or scale is None:
        raise FormatError(f"{p}: tensor {name}.qweight/.scale missing")
    layout = rec.get("layout")
    eshape, edt = _expected_qweight(kind, n, k, layout)
    if tuple(data.shape) != eshape or data.dtype != edt:
        raise FormatError(f"{p}: {name}.qweight is {data.dtype} {tuple(data.shape)}, expected {edt} {eshape} "
                          f"for {kind} [{n}, {k}]")
    if scale.dtype != torch.float32:
        raise FormatError(f"{p}: {name}.scale must be float32, got {scale.dtype}")
    if not bool(torch.isfinite(scale).all()):
        raise FormatError(f"{p}: {name}.scale holds NaN or infinite values")
    d = data.numpy()
    kp = {"ternary": 128, "int8": 32, "int4": 64, "binary": 128}[kind]
    kp = -(-k // kp) * kp
    if kind == "ternary" and layout == "base3":
        if (d >= 243).any():
            raise FormatError(f"{p}: {name}.qweight holds bytes >= 243, invalid in base-3")
        w: Any = PackedBase3(d, n, k)
    elif kind == "ternary":
        w = PackedTernary(data=d, n=n, k=k, k_padded=kp)
    elif kind == "int8":
        w = PackedInt8(data=d, n=n, k=k, k_padded=kp)
    elif kind == "binary":
        w = PackedBinary(data=d, n=n, k=k, k_padded=kp)
    else:
        g = rec.get("group_size")
        if g not in (32, 64, 128):
            raise FormatError(f"{p}: {name}: int4 group_size {g!r} is not 32, 64 or 128")
        w = PackedInt4(data=d, n=n, k=k, k_padded=kp, group_size=g)
    try:
        return PackedLinear(kind, w, scale.numpy())
    except ValueError as e:
        raise FormatError(f"{p}: {name}: {e}") from None


def load_packed(path: str | Path, load_tokenizer: bool = True) -> PackedModel:
    """Read a packed folder written by :func:`save_packed` (format version 1 or 2)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not is_packed(p):
        raise FormatError(f"{p} is not a tritlm packed model folder")
    meta = read_json(p / CONFIG_FILE)  # is_packed parsed it: a dict
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise FormatError(f"{p}: packed format version {version!r} is newer than this tritlm ({VERSION})")
    if not isinstance(meta.get("model"), dict):
        raise FormatError(f"{p}/config.json has no model config")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except ConfigError as e:
        raise FormatError(f"{p}/config.json: {e}") from None
    check_context(str(p), cfg)
    shapes = cfg.linear_shapes()
    if version >= 2:
        records = meta.get("tensors")
    else:  # v1: every block Linear ternary with one scale per tensor
        old = meta.get("shapes")
        records = {n: {"kind": "ternary", "shape": s} for n, s in old.items()} if isinstance(old, dict) else None
    if not isinstance(records, dict):
        raise FormatError(f"{p}: config.json has no tensor records")
    if set(records) != set(shapes):
        missing = sorted(set(shapes) - set(records))[:3]
        extra = sorted(set(records) - set(shapes))[:3]
        raise FormatError(f"{p}: block Linears do not match the model config (missing {missing}, unexpected {extra})")
    try:
        tensors = load_file(str(p / WEIGHTS_FILE))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise FormatError(f"{p}/{WEIGHTS_FILE} cannot be read ({str(e).splitlines()[0][:120]})") from None
    linears = {name: _read_linear(p, tensors, name, records[name], shapes[name]) for name in shapes}
    for name, want in fp_shapes(cfg).items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != want or not t.is_floating_point():
            got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise FormatError(f"{p}: {name} is {got}, the model config needs a float tensor {want}")
        if not bool(torch.isfinite(t).all()):
            raise FormatError(f"{p}: {name} holds NaN or infinite values")
    extra = sorted(set(tensors) - set(fp_shapes(cfg)))
    if extra:
        raise FormatError(f"{p}: unexpected tensors {extra[:3]}")
    tok = None
    if load_tokenizer and (p / TOKENIZER_DIR).exists():
        from tritlm.data import load_tokenizer as _lt

        tok = _lt(p / TOKENIZER_DIR)
    return PackedModel(cfg, linears, tensors, tok, p, meta={"fp_dtype": meta.get("fp_dtype"), "version": version})


def pack_model(src: str | Path, out: str | Path, fp_dtype: str = "fp16", quant_spec: Any = None,
               quant: Any = None, overwrite: bool = False, ternary_layout: str = "i2s") -> tuple[Path, dict]:
    """``tritlm pack``: any model tritlm reads as floats (a training checkpoint, GGUF, .1bit, a
    transformers folder) -> packed folder. Returns (folder, size report).

    Post-training re-quantisation before packing (:func:`tritlm.formats.ptq.requantize`):
    ``quant_spec`` (``{glob: fields or kind}``, e.g. from :func:`~tritlm.model.config.load_quant_spec`)
    gives the layers it matches new kinds, the others keep theirs; ``quant`` (a kind name or
    QuantConfig fields) gives every layer the spec does not match that kind. Without either, each
    layer keeps the kind it was trained in.
    """
    from tritlm.formats.detect import load_transformer
    from tritlm.model.config import quant_from_dict, quant_overrides_from

    model, tok, _ = load_transformer(src)
    if quant is not None or quant_spec is not None:
        from tritlm.formats.ptq import requantize

        if quant is None:  # the spec's globs first, then the trained overrides for the rest
            base = model.cfg.quant
            ov = quant_overrides_from(quant_spec, base) + model.cfg.quant_overrides
        else:  # a new default for every layer the spec does not name
            base = quant_from_dict(quant)
            ov = () if quant_spec is None else quant_overrides_from(quant_spec, base)
        model = requantize(model, base, ov)
    if not model.cfg.quantised:
        log.warning("%s has no quantised layers: the packed model keeps every Linear in %s", src, fp_dtype)
    pm = from_transformer(model, tok, fp_dtype, ternary_layout)
    path = save_packed(pm, out, overwrite=overwrite)
    return path, size_report(pm, path)


def pack_checkpoint(checkpoint: str | Path, out: str | Path, fp_dtype: str = "fp16",
                    overwrite: bool = False) -> tuple[Path, dict]:
    """A training checkpoint -> packed folder, every layer in its trained kind (see :func:`pack_model`)."""
    return pack_model(checkpoint, out, fp_dtype, overwrite=overwrite)


def size_report(pm: PackedModel, path: Path | None = None) -> dict:
    """Weight bytes vs the ideal (each kind's bits per weight + its scales, FP parts as stored)."""
    b = pm.weight_bytes()
    ideal = sum(pl.ideal_bytes for pl in pm.linears.values()) + b["fp"]
    actual = b["quantised"] + b["scales"] + b["fp_linears"] + b["fp"]
    kinds: dict[str, dict[str, float]] = {}
    for pl in pm.linears.values():
        e = kinds.setdefault(pl.kind, {"layers": 0, "params": 0, "bytes": 0, "ideal_bytes": 0.0})
        e["layers"] += 1
        e["params"] += pl.n * pl.k
        e["bytes"] += pl.nbytes
        e["ideal_bytes"] += pl.ideal_bytes
    rep = {"ternary_params": pm.ternary_params(), "ternary_bytes": b["quantised"] + b["scales"],
           "fp_linear_bytes": b["fp_linears"], "fp_bytes": b["fp"],
           "weight_bytes": actual, "ideal_bytes": int(ideal), "overhead_pct": 100.0 * (actual / ideal - 1),
           "kinds": kinds}
    if path is not None:
        rep["file_bytes"] = (Path(path) / WEIGHTS_FILE).stat().st_size
    return rep
