"""Typed training configuration, loadable from YAML and overridable with ``key.sub=value`` strings."""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from tritlm.errors import ConfigError
from tritlm.nn.bitlinear import KERNELS  # set_kernel's choices for the BitLinear forward
from tritlm.train.schedule import LAM_SCHEDULES, QuantSchedule

log = logging.getLogger(__name__)

# The strings the trainer acts on (train/schedule.py lr_at / wd_at, trainer._autocast,
# distributed.init_distributed); anything else would be ignored or crash mid-run.
LR_SCHEDULES = ("constant", "linear", "cosine", "two-stage")
WD_SCHEDULES = ("constant", "two-stage")
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    corpus: str | None = None  # file, folder or .gz; None = the bundled Tiny Shakespeare
    dataset_dir: str | None = None  # an already tokenised dataset (from `tritlm tokenize`)
    tokenizer: str = "char"  # char | byte | bpe:<vocab> | path to tokenizer.json / .model
    val_fraction: float = 0.1


@dataclass
class OptimConfig:
    # Defaults = the best ternary recipe on Tiny Shakespeare (benchmarks/RESULTS.md).
    lr: float = 2e-3  # best of the ternary sweep on Tiny Shakespeare (benchmarks/RESULTS.md)
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "two-stage"  # constant | linear | cosine | two-stage
    warmup_steps: int = 100
    two_stage_split: float = 0.5
    two_stage_ratio: float = 0.6
    wd_schedule: str = "two-stage"  # constant | two-stage (BitNet: 0.1 then 0)
    grad_clip: float = 1.0  # 0 = off


@dataclass
class StabilityConfig:
    enabled: bool = True
    ema_beta: float = 0.95
    spike_sigma: float = 6.0  # loss > ema + sigma * ema_std is a spike ...
    spike_ratio: float = 1.5  # ... and so is loss > ratio * ema
    warmup_steps: int = 50  # no spike detection before the EMA has settled
    lr_backoff: float = 0.5
    max_rollbacks: int = 5
    # Fault injection for tests: steps at which the loss is made NaN / 100x larger (once each).
    inject_nan_at: list[int] = field(default_factory=list)
    inject_spike_at: list[int] = field(default_factory=list)


@dataclass
class FinetuneConfig:
    """Turning an existing full-precision model into a quantised one (``tritlm finetune``)."""

    # The model to start from: a transformers Llama / Mistral / Qwen2-style folder, a tritlm
    # checkpoint, GGUF or .1bit file. None = pretraining from scratch (``tritlm train``).
    source: str | None = None
    # Knowledge distillation from the frozen source: loss = CE + distill_alpha * tau^2 *
    # KL(teacher || student) at temperature distill_tau (0 = no teacher is loaded) ...
    distill_alpha: float = 0.0
    distill_tau: float = 1.0
    # ... + hidden_mse * mean over layers of the squared distance between the L2-normalised hidden
    # states of teacher and student (OneBit's normalised hidden-state loss).
    hidden_mse: float = 0.0
    # Insert SubLN (RMSNorm before o_proj and down_proj, BitDistill's first stage): its gains are
    # fitted on training batches to reproduce the unnormalised input, and it is blended in with
    # lambda, so at lambda = 0 the student still computes exactly the source's function.
    sub_norm: bool = False
    sub_norm_calib_batches: int = 4
    # Teacher weights: auto = bfloat16 on GPU, float32 on CPU.
    teacher_dtype: str = "auto"


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's ModelConfig
    fp: bool = False  # train the full-precision twin instead
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quant_schedule: QuantSchedule = field(default_factory=QuantSchedule)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    batch_size: int = 12
    block_size: int = 64
    grad_accum: int = 1
    label_smoothing: float = 0.0
    max_steps: int = 2000
    eval_interval: int = 250
    eval_batches: int | None = None  # None = the whole validation split
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    seed: int = 1337
    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    threads: int | None = None
    tensorboard: bool = True
    # Under torchrun: shard weights, gradients and optimizer state with FSDP2 (instead of DDP's
    # full replicas) and write sharded checkpoints. In a single process it is a no-op (a warning).
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True  # free each block's gathered weights between forward and backward
    kernel: str = "auto"  # BitLinear forward: auto (Triton on CUDA where supported) | torch | triton

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        keys = ", ".join(f"{where}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s): {keys} (valid: {', '.join(sorted(names))})")
    kw = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            kw[k] = _build(t, v, f"{where}{k}.")
        else:
            kw[k] = _coerce(v, t, f"{where}{k}")
    return cls(**kw)


def _coerce(v: Any, t: Any, key: str) -> Any:
    """Check a value against a simple annotation, converting strings from the command line."""
    origin, args = get_origin(t), get_args(t)
    if origin in (Union, types.UnionType):
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(v, inner[0], key) if inner else v
    try:
        if t is bool:
            if isinstance(v, str):
                if v.lower() in ("1", "true", "yes", "on"):
                    return True
                if v.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(v)
        if t is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            return int(v)
        if t is float:
            return float(v)
        if t is str:
            return str(v)
        if origin is list:
            if isinstance(v, str):
                v = yaml.safe_load(v) if v.strip() else []
            if not isinstance(v, list):
                v = [v]
            return [_coerce(x, args[0], key) for x in v] if args else list(v)
        if origin is dict:
            if isinstance(v, str):
                v = yaml.safe_load(v)
            if not isinstance(v, dict):
                raise ValueError
            return dict(v)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config key {key}: cannot use {v!r} as {getattr(t, '__name__', t)}") from None
    return v


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`; a bad value is a :class:`ConfigError` naming its key."""
    cfg = _build(TrainConfig, d or {}, "")
    validate_config(cfg)
    return cfg


def _num(key: str, v: Any, lo: float | None = None, hi: float | None = None, *,
         lo_open: bool = False, hi_open: bool = False, what: str = "") -> None:
    """Refuse a non-finite ``v`` or one outside [lo, hi] (open ends with lo_open / hi_open)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"config key {key}: {v!r} must be a finite number")
    bad = ((lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    if bad:
        if lo is not None and hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            rng = f"{'<' if hi_open else '<='} {hi:g}"
        raise ConfigError(f"config key {key}: {v!r} must be {rng}" + (f" ({what})" if what else ""))


def _choice(key: str, v: str, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise ConfigError(f"config key {key}: unknown value {v!r}; choose one of: {', '.join(allowed)}")


def validate_config(cfg: TrainConfig) -> None:
    """Every value the trainer would choke on, refused now with its key (not at step N)."""
    from tritlm.model.config import PRESETS

    _choice("preset", cfg.preset, tuple(PRESETS))
    _choice("device", cfg.device, DEVICES)
    _choice("dtype", cfg.dtype, DTYPES)
    _choice("kernel", cfg.kernel, KERNELS)
    for k in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_interval", "log_interval",
              "ckpt_interval"):
        _num(k, getattr(cfg, k), 1)
    if cfg.eval_batches is not None:
        _num("eval_batches", cfg.eval_batches, 1, what="or null for the whole validation split")
    if cfg.threads is not None:
        _num("threads", cfg.threads, 1, what="or null for torch's default")
    _num("keep_checkpoints", cfg.keep_checkpoints, 0, what="0 = keep all")
    _num("label_smoothing", cfg.label_smoothing, 0, 1, hi_open=True)
    _num("data.val_fraction", cfg.data.val_fraction, 0, 1, lo_open=True, hi_open=True)

    o = cfg.optim
    _num("optim.lr", o.lr, 0, lo_open=True)
    _num("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    _num("optim.beta1", o.beta1, 0, 1, hi_open=True)
    _num("optim.beta2", o.beta2, 0, 1, hi_open=True)
    _num("optim.eps", o.eps, 0, lo_open=True)
    _num("optim.weight_decay", o.weight_decay, 0)
    _choice("optim.schedule", o.schedule, LR_SCHEDULES)
    _choice("optim.wd_schedule", o.wd_schedule, WD_SCHEDULES)
    _num("optim.warmup_steps", o.warmup_steps, 0)
    _num("optim.two_stage_split", o.two_stage_split, 0, 1)
    _num("optim.two_stage_ratio", o.two_stage_ratio, 0)
    _num("optim.grad_clip", o.grad_clip, 0, what="0 = off")

    q = cfg.quant_schedule
    for k in ("anneal_steps", "lam_warmup_steps", "residual_steps"):
        _num(f"quant_schedule.{k}", getattr(q, k), 0)
    _num("quant_schedule.alpha0", q.alpha0, 0, lo_open=True)
    _num("quant_schedule.alpha1", q.alpha1, 0, lo_open=True)
    _num("quant_schedule.residual_init", q.residual_init)
    _num("quant_schedule.lam_warmup_frac", q.lam_warmup_frac, 0, 1, what="of max_steps; 0 = use lam_warmup_steps")
    _choice("quant_schedule.lam_schedule", q.lam_schedule, LAM_SCHEDULES)
    _num("quant_schedule.lam_k", q.lam_k, 0, lo_open=True)

    f = cfg.finetune
    _num("finetune.distill_alpha", f.distill_alpha, 0)
    _num("finetune.distill_tau", f.distill_tau, 0, lo_open=True)
    _num("finetune.hidden_mse", f.hidden_mse, 0)
    _num("finetune.sub_norm_calib_batches", f.sub_norm_calib_batches, 1)
    _choice("finetune.teacher_dtype", f.teacher_dtype, DTYPES)
    if f.source is None and (f.distill_alpha > 0 or f.hidden_mse > 0 or f.sub_norm):
        raise ConfigError("finetune.distill_alpha / hidden_mse / sub_norm need finetune.source (use "
                          "`tritlm finetune SRC`)")
    if f.source is not None and cfg.fp:
        raise ConfigError("fp: true with finetune.source would train the source model further in full "
                          "precision; fine-tuning quantises it (set the kinds with --quant-spec)")

    s = cfg.stability
    _num("stability.ema_beta", s.ema_beta, 0, 1, hi_open=True)
    _num("stability.spike_sigma", s.spike_sigma, 0)
    _num("stability.spike_ratio", s.spike_ratio, 0, lo_open=True)
    _num("stability.warmup_steps", s.warmup_steps, 0)
    _num("stability.lr_backoff", s.lr_backoff, 0, 1, lo_open=True)
    _num("stability.max_rollbacks", s.max_rollbacks, 0)
    for k in ("inject_nan_at", "inject_spike_at"):
        for i, step in enumerate(getattr(s, k)):
            _num(f"stability.{k}[{i}]", step, 0)

    if o.warmup_steps > cfg.max_steps:
        log.warning("optim.warmup_steps %d is longer than the run (max_steps %d): the LR never "
                    "reaches optim.lr %g", o.warmup_steps, cfg.max_steps, o.lr)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: dict[str, Any] | None = None, **direct: Any) -> TrainConfig:
    """Start from ``base`` (a command's own defaults), merge a YAML config (optional) over it, then
    apply ``a.b=value`` overrides, then ``direct`` keys."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    d = _merge(base or {}, d)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        _set(d, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    for key, v in direct.items():
        if v is not None:
            _set(d, key, v)
    return config_from_dict(d)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a section in ``top`` keeps base keys it omits)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section")
        cur = nxt
    cur[parts[-1]] = value
