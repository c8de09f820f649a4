"""The training loop: data -> model -> AdamW -> checkpoints, with rollback on loss spikes.

Every input of a step (the batch, the LR, the weight decay, the quantisation state) is a pure
function of the step number and a little saved state, so a run resumed from a checkpoint replays
exactly the losses of an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tritlm.data import TokenData, default_corpus_path, prepare_dataset
from tritlm.errors import ConfigError, TritlmError
from tritlm.formats import checkpoint as ck
from tritlm.formats import sharded
from tritlm.io_atomic import run_lock
from tritlm.model.config import ModelConfig, preset
from tritlm.model.transformer import Transformer
from tritlm.train.config import TrainConfig
from tritlm.train.distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, init_distributed
from tritlm.train.metrics import MetricsLogger, measure_peak_flops
from tritlm.train.schedule import lr_at, quant_state_at, wd_at
from tritlm.train.stability import SpikeDetector

log = logging.getLogger(__name__)


class TrainingDiverged(TritlmError):
    """Too many rollbacks: the run cannot make progress at any LR it tried."""


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    model_config: ModelConfig
    steps: int
    train_loss: float
    val_loss: float
    val_history: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    step_ms: float = 0.0  # median over the run (first steps excluded)
    mfu: float = 0.0
    rollbacks: int = 0
    params: int = 0


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    base = preset(cfg.preset)
    merged = {**base.to_dict(), **cfg.model}
    merged.setdefault("vocab_size", vocab_size)
    if "vocab_size" not in cfg.model:
        merged["vocab_size"] = vocab_size
    if merged["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size {merged['vocab_size']} < tokenizer vocabulary {vocab_size}")
    merged["max_seq_len"] = max(merged["max_seq_len"], cfg.block_size)
    mcfg = ModelConfig.from_dict(merged)
    return mcfg.fp_twin() if cfg.fp else mcfg


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: not on norms, biases or embeddings."""
    decay, no_decay, seen = [], [], set()
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class Trainer:
    def __init__(self, cfg: TrainConfig, callback: Callable[[dict[str, Any]], None] | None = None):
        self.cfg = cfg
        self.callback = callback or (lambda ev: None)
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self._dist = DistInfo()
        self._fsdp = False  # set by run(): cfg.fsdp under torchrun

    # ---- set-up -------------------------------------------------------------------------------
    def _data(self, dist: DistInfo, tokenizer: Any = None) -> TokenData:
        """The token data; ``tokenizer`` (a fine-tune's source tokenizer) replaces data.tokenizer."""
        d = self.cfg.data
        if d.dataset_dir:
            data = TokenData(d.dataset_dir)
            if tokenizer is not None and data.tokenizer.fingerprint() != tokenizer.fingerprint():
                raise ConfigError(f"{d.dataset_dir} was tokenised with another tokenizer than the source "
                                  f"model's ({data.tokenizer.fingerprint()} vs {tokenizer.fingerprint()}); "
                                  "pass the corpus with --data instead")
            return data
        target = self.out / "data"
        if dist.is_main:
            prepare_dataset(d.corpus or default_corpus_path(), target,
                            tokenizer=tokenizer if tokenizer is not None else d.tokenizer,
                            val_fraction=d.val_fraction)
        barrier(dist)
        return TokenData(target)

    def _finetune_model(self, dist: DistInfo, data: TokenData, source: Transformer):
        """(student, distiller or None) for a fine-tune: the source's weights in the student's kinds."""
        from tritlm.train import finetune as ft

        fc, cfg = self.cfg.finetune, self.cfg
        mcfg = ft.student_config(source.cfg, cfg)
        torch.manual_seed(cfg.seed)
        model = Transformer(mcfg)
        inserted = mcfg.sub_norm and not source.cfg.sub_norm
        ft.init_student(model, source, inserted)
        if inserted:
            n = min(fc.sub_norm_calib_batches, max(1, data.n_tokens("train") // (cfg.batch_size * cfg.block_size)))
            batches = [data.get_batch("train", i, cfg.batch_size, cfg.block_size, seed=cfg.seed + 1)[0]
                       for i in range(n)]
            resid = ft.fit_sub_norm_gains(model, source, batches)
            log.info("SubLN inserted; gain fit residual %.3f (mean over %d norms)",
                     sum(resid.values()) / len(resid), len(resid))
        model = model.to(dist.device)
        distiller = None
        if fc.distill_alpha > 0 or fc.hidden_mse > 0:
            teacher = source.to(dist.device, ft.teacher_dtype(fc, dist.device))
            distiller = ft.Distiller(teacher, fc, model)
        return model, distiller

    def _autocast(self, dist: DistInfo):
        want = self.cfg.dtype
        if want == "bfloat16" or (want == "auto" and dist.device.type == "cuda"):
            return torch.autocast(dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        """Train (or resume) into ``out_dir``, holding its run lock (rank 0) throughout: a second
        run into the same folder refuses while this one is alive."""
        dist = init_distributed(self.cfg.device)
        lock = run_lock(self.out) if dist.is_main else contextlib.nullcontext()
        with lock:
            return self._run(dist, resume)

    def _run(self, dist: DistInfo, resume: bool) -> TrainResult:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        source = None
        if cfg.finetune.source is not None:
            from tritlm.train.finetune import load_source

            source, src_tok = load_source(cfg.finetune.source)
            data = self._data(dist, src_tok)
        else:
            data = self._data(dist)
        tok = data.tokenizer
        if data.n_tokens("train") <= cfg.block_size + 1:
            raise ConfigError(f"block_size {cfg.block_size} is too long for {data.n_tokens('train')} "
                              "training tokens")

        distiller = None
        if source is not None:
            model, distiller = self._finetune_model(dist, data, source)
            mcfg = model.cfg
        else:
            mcfg = resolve_model_config(cfg, tok.vocab_size)
            torch.manual_seed(cfg.seed)
            model = Transformer(mcfg).to(dist.device)
        _apply_kernel(model, cfg.kernel)
        self._dist, self._fsdp = dist, cfg.fsdp and dist.enabled
        if cfg.fsdp and not dist.enabled:
            log.warning("fsdp: true in a single process has nothing to shard; training without FSDP "
                        "(launch with torchrun --nproc_per_node=N)")
        if self._fsdp:  # sharded in place: the optimizer must see the DTensor parameters
            from tritlm.train.parallelize import data_parallel_mesh, parallelize

            model = parallelize(model, data_parallel_mesh(dist), cfg)
        opt = build_optimizer(model, cfg)
        train_model: torch.nn.Module = model
        if dist.enabled and not self._fsdp:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

        st = {"lr_scale": 1.0, "data_offset": 0, "rollbacks": 0, "consumed": [], "val_history": []}
        detector = SpikeDetector(cfg.stability.ema_beta, cfg.stability.spike_sigma,
                                 cfg.stability.spike_ratio, cfg.stability.warmup_steps)
        start = 0
        if dist.is_main:
            ck.clean_partial(self.ckpt_root)
        barrier(dist)
        latest = ck.latest_checkpoint(self.ckpt_root)
        if resume and latest is not None:
            start = self._restore(latest, model, opt, st, detector, tok)
            log.info("resumed from %s at step %d", latest, start)
        elif resume:
            log.warning("--resume: no checkpoint in %s; starting from scratch", self.ckpt_root)
        elif latest is not None:
            raise ConfigError(f"{self.out} already holds checkpoints: pass --resume to continue it, "
                              "or choose another --out")

        if start > 0 and dist.is_main:
            _truncate_csv(self.out / "metrics.csv", start)
        metrics = MetricsLogger(self.out, enabled=dist.is_main, tensorboard=cfg.tensorboard,
                                resume=start > 0)
        full_cfg = {"model": mcfg.to_dict(), "train": cfg.to_dict(),
                    "tokenizer": tok.kind, "tokenizer_fingerprint": tok.fingerprint()}
        save = self._saver(dist, model, opt, st, detector, full_cfg, tok)
        if start == 0:
            save(0)  # the rollback point before the first step

        peak = measure_peak_flops(dist.device)
        fpt = model.flops_per_token(cfg.block_size)
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * dist.world_size
        quantised = mcfg.quantised
        if quantised:
            from tritlm.nn import clamp_latent_, set_quant_state
        self.callback({"event": "start", "step": start, "max_steps": cfg.max_steps,
                       "params": model.num_params(), "model": mcfg})

        step, last_loss, last_val = start, float("nan"), float("nan")
        step_times: list[float] = []
        warmup_times: list[float] = []  # used only when a run is too short to have step_times
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            o = cfg.optim
            lr = lr_at(step, lr=o.lr, max_steps=cfg.max_steps, schedule=o.schedule,
                       warmup_steps=o.warmup_steps, min_lr_ratio=o.min_lr_ratio,
                       two_stage_split=o.two_stage_split, two_stage_ratio=o.two_stage_ratio)
            lr *= st["lr_scale"]
            wd = wd_at(step, weight_decay=o.weight_decay, max_steps=cfg.max_steps,
                       wd_schedule=o.wd_schedule, two_stage_split=o.two_stage_split)
            opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
            opt.param_groups[0]["weight_decay"] = wd
            if quantised:
                set_quant_state(model, **quant_state_at(step, cfg.quant_schedule, cfg.max_steps))

            loss_sum = torch.zeros((), device=dist.device)
            for micro in range(cfg.grad_accum):
                x, y = data.get_batch("train", step + st["data_offset"], cfg.batch_size, cfg.block_size,
                                      seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                      micro=micro)
                x, y = x.to(dist.device), y.to(dist.device)
                sync = micro == cfg.grad_accum - 1 or not dist.enabled
                if self._fsdp:  # FSDP2's no_sync: keep unsharded gradients until the last micro-batch
                    model.set_requires_gradient_sync(sync)
                    ctx = contextlib.nullcontext()
                else:
                    ctx = contextlib.nullcontext() if sync else train_model.no_sync()
                with ctx, self._autocast(dist):
                    if distiller is not None:
                        loss = distiller(train_model, x, y, cfg.label_smoothing)
                    else:
                        _, loss = train_model(x, y, label_smoothing=cfg.label_smoothing)
                    loss = self._inject(step, loss, st)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            loss_val = all_reduce_mean(loss_sum, dist).item()
            if self._fsdp:
                from tritlm.train.parallelize import grad_norm

                gnorm = grad_norm(model, o.grad_clip)
            else:
                gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                         if o.grad_clip > 0 else _grad_norm(model))
            gnorm_val = float(all_reduce_mean(gnorm.detach().reshape(()).clone(), dist))
            reason = detector.check(loss_val) if cfg.stability.enabled else None
            if reason is None and cfg.stability.enabled and not math.isfinite(gnorm_val):
                reason = "nan"
            if reason is not None:
                step = self._rollback(reason, step, loss_val, model, opt, st, detector, tok, metrics)
                continue

            opt.step()
            opt.zero_grad(set_to_none=True)
            if quantised:
                clamp_latent_(model)
            detector.update(loss_val)
            step += 1
            last_loss = loss_val
            dt = time.perf_counter() - t0
            # the first steps include one-off allocation costs
            (step_times if step - start > 3 else warmup_times).append(dt)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                tps = tokens_per_step / dt
                metrics.log(step, "train", loss=loss_val, lr=lr, wd=wd, grad_norm=gnorm_val,
                            tokens_per_s=tps, mfu=fpt * tps / peak, step_ms=dt * 1e3)
            self.callback({"event": "step", "step": step, "loss": loss_val, "lr": lr})
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                if quantised:  # evaluate the model as it now is: at the state of the next step
                    set_quant_state(model, **quant_state_at(step, cfg.quant_schedule, cfg.max_steps))
                last_val = self.evaluate(model, data, dist)
                st["val_history"].append([step, last_val])
                metrics.log(step, "val", loss=last_val)
                self.callback({"event": "eval", "step": step, "val_loss": last_val})
            if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
                save(step)

        metrics.close()
        # median: a step stalled by another process on a shared machine does not move it
        times = step_times or warmup_times
        step_s = statistics.median(times) if times else 0.0
        tps = tokens_per_step / step_s if step_s > 0 else 0.0
        final = ck.latest_checkpoint(self.ckpt_root)
        result = TrainResult(self.out, final, mcfg, step, last_loss, last_val,
                             [tuple(v) for v in st["val_history"]], tps, step_s * 1e3,
                             fpt * tps / peak, st["rollbacks"], model.num_params())
        self.callback({"event": "end", "result": result})
        return result

    # ---- pieces -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: Transformer, data: TokenData, dist: DistInfo) -> float:
        """Mean loss per token over the validation split (all of it unless eval_batches is set)."""
        if self._fsdp:
            return self._evaluate_lockstep(model, data, dist)
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        bs = max(self.cfg.batch_size, 32)
        for i, (x, y) in enumerate(data.eval_batches("val", bs, self.cfg.block_size)):
            if self.cfg.eval_batches is not None and i >= self.cfg.eval_batches * dist.world_size:
                break
            if i % dist.world_size != dist.rank:
                continue
            x, y = x.to(dist.device), y.to(dist.device)
            with self._autocast(dist):
                _, loss = model(x, y)
            tot += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64)
        tot = all_reduce_sum(tot.to(dist.device), dist).cpu()
        model.train()
        return float(tot[0] / tot[1])

    @torch.no_grad()
    def _evaluate_lockstep(self, model: torch.nn.Module, data: TokenData, dist: DistInfo) -> float:
        """:meth:`evaluate` under FSDP, where every forward is a collective (it all-gathers weights):
        batches go round-robin to the processes as there, but a process left without one in the
        last round runs that round's first batch again and counts nothing, so all run alike."""
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        bs = max(self.cfg.batch_size, 32)
        batches = data.eval_batches("val", bs, self.cfg.block_size)
        if self.cfg.eval_batches is not None:
            batches = itertools.islice(batches, self.cfg.eval_batches * dist.world_size)
        while chunk := list(itertools.islice(batches, dist.world_size)):
            mine = dist.rank < len(chunk)
            x, y = chunk[dist.rank] if mine else chunk[0]
            x, y = x.to(dist.device), y.to(dist.device)
            with self._autocast(dist):
                _, loss = model(x, y)
            if mine:
                tot += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64)
        tot = all_reduce_sum(tot.to(dist.device), dist).cpu()
        model.train()
        return float(tot[0] / tot[1])

    def _inject(self, step: int, loss: torch.Tensor, st: dict) -> torch.Tensor:
        s = self.cfg.stability
        if step in s.inject_nan_at and ("nan", step) not in map(tuple, st["consumed"]):
            st["consumed"].append(["nan", step])
            log.warning("step %d: injecting a NaN loss (stability test)", step)
            return loss * float("nan")
        if step in s.inject_spike_at and ("spike", step) not in map(tuple, st["consumed"]):
            st["consumed"].append(["spike", step])
            log.warning("step %d: injecting a 100x loss spike (stability test)", step)
            return loss * 100.0
        return loss

    def _saver(self, dist, model, opt, st, detector, full_cfg, tok):
        def save(step: int) -> None:
            if self._fsdp:  # every process writes its own shards
                state = {**st, "detector": detector.state()}
                sharded.save_sharded(self.ckpt_root, step, model, opt, state, full_cfg, tok,
                                     self.cfg.keep_checkpoints, dist.rank, dist.world_size)
                return
            if dist.is_main:
                state = {**st, "detector": detector.state()}
                ck.save_checkpoint(self.ckpt_root, step, model, opt, state, full_cfg, tok,
                                   keep=self.cfg.keep_checkpoints)
            barrier(dist)
        return save

    def _restore(self, path: Path, model, opt, st, detector, tok) -> int:
        if self._fsdp or sharded.is_sharded(path):
            return self._restore_sharded(path, model, opt, st, detector, tok)
        c = ck.read_checkpoint(path)
        _check_tokenizer(path, c["config"], tok)
        ck.load_model_state(model, c["model"], str(path))
        meta = c["state"].pop("optimizer", None)
        if meta is not None:
            tensors = {k: v for k, v in c["optim"].items() if k.startswith("state.")}
            ck.restore_optimizer(opt, tensors, meta)
        ck.set_rng_state({k: v for k, v in c["optim"].items() if k.startswith("rng.")})
        return _restore_state(c["state"], st, detector)

    def _restore_sharded(self, path: Path, model, opt, st, detector, tok) -> int:
        """A sharded checkpoint (DCP) into the model, sharded by FSDP or not (DCP reshards on load)."""
        if not sharded.is_sharded(path):
            raise ConfigError(f"{path} is a single-folder checkpoint (written without FSDP); resume it "
                              "without fsdp, or start a new --out")
        from tritlm.safe_json import read_json

        _check_tokenizer(path, read_json(path / ck.CONFIG_FILE), tok)
        state = sharded.load_sharded(path, model, opt, self._dist.rank)
        return _restore_state(state, st, detector)

    def _rollback(self, reason, step, loss_val, model, opt, st, detector, tok, metrics) -> int:
        s = self.cfg.stability
        opt.zero_grad(set_to_none=True)
        st["rollbacks"] += 1
        if st["rollbacks"] > s.max_rollbacks:
            raise TrainingDiverged(f"step {step}: {reason} after {s.max_rollbacks} rollbacks; giving up")
        latest = ck.latest_checkpoint(self.ckpt_root)
        consumed, rollbacks = list(st["consumed"]), st["rollbacks"]
        lr_scale, offset = st["lr_scale"] * s.lr_backoff, st["data_offset"] + 1_000_003
        back = self._restore(latest, model, opt, st, detector, tok)
        # The fault history and the new LR scale survive the rollback; the data window moves on
        # so the run does not replay the batch that blew up.
        st.update(consumed=consumed, rollbacks=rollbacks, lr_scale=lr_scale, data_offset=offset)
        log.warning("step %d: %s (loss %.4g); rolled back to step %d, LR scale now %.3g",
                    step, reason, loss_val, back, lr_scale)
        metrics.log(step, "train", loss=loss_val, event=f"{reason}: rollback to {back}")
        self.callback({"event": "rollback", "step": step, "reason": reason, "to": back})
        return back


def _check_tokenizer(path: Path, config: dict, tok) -> None:
    fp = config.get("tokenizer_fingerprint")
    if fp is not None and fp != tok.fingerprint():
        raise ConfigError(f"{path} was trained with a different tokenizer ({config.get('tokenizer')} "
                          f"fingerprint {str(fp)[:12]}, this run's {tok.kind} {tok.fingerprint()[:12]}); "
                          "resume with the same data and tokenizer")


def _restore_state(state: dict, st: dict, detector: SpikeDetector) -> int:
    """The trainer's own state from a checkpoint's state.json into ``st`` / ``detector``; its step."""
    detector.load(state.pop("detector", {}))
    for k in ("lr_scale", "data_offset", "rollbacks", "consumed", "val_history"):
        if k in state:
            st[k] = state[k]
    return int(state["step"])


def _apply_kernel(model: torch.nn.Module, kernel: str) -> None:
    """The BitLinear kernel choice (``kernel``: auto = the Triton int8 forward on CUDA where the
    layer's config has one, the torch path elsewhere)."""
    from tritlm.nn import set_kernel

    set_kernel(model, kernel)


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def _truncate_csv(path: Path, start: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so the CSV reads as one clean run."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r["step"] and int(r["step"]) <= start]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MetricsLogger.FIELDS)
        w.writeheader()
        w.writerows(keep)
