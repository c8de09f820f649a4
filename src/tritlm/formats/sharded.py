"""Sharded checkpoints of FSDP runs: ``torch.distributed.checkpoint`` (DCP) inside our checkpoint folders.

An FSDP run's ``step-000500/`` keeps ``state.json`` (step, schedule and stability state, data
offset), ``config.json`` and ``tokenizer/`` as in :mod:`tritlm.formats.checkpoint`, but its tensors
live in a DCP folder ``dcp/`` (``.metadata`` plus one ``.distcp`` file per process: every process
writes only its own shards, nothing is gathered) and each process's RNG state in
``rng-rank<R>.safetensors``. ``state.json`` gains ``"sharded": {"world_size": N, "optimizer": bool}``.

The folder is written by all processes as ``step-000500.tmp-<pid of rank 0>/`` and put in place by
rank 0 through :func:`tritlm.io_atomic.atomic_path` once every process has written and fsynced its
files, so a kill at any moment leaves the previous checkpoint or the new one (the trainer's
:func:`tritlm.formats.checkpoint.clean_partial` removes the temporary), exactly as for single-folder
checkpoints. DCP reshards on load, so a run may resume on another number of processes.

:func:`convert_sharded` turns one into a single-folder checkpoint (``model.safetensors``) that
``tritlm pack``, ``generate`` and ``eval`` read; it needs no process group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from tritlm.errors import ConfigError, FormatError
from tritlm.formats import checkpoint as ck
from tritlm.io_atomic import atomic_path, write_error, write_json_atomic
from tritlm.safe_json import read_json

log = logging.getLogger(__name__)
SHARDED_DIR = ck.SHARDED_DIR


def is_sharded(path: str | Path) -> bool:
    """A checkpoint folder whose tensors are a DCP folder (written by an FSDP run)."""
    p = Path(path)
    return (p / SHARDED_DIR).is_dir() and not (p / ck.MODEL_FILE).is_file()


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _first_failure(e: BaseException) -> BaseException:
    """The underlying error of a DCP ``CheckpointException`` (rank -> (exception, traceback))."""
    failures = getattr(e, "failures", None)
    cause = next(iter(failures.values())) if failures else e
    return cause[0] if isinstance(cause, tuple) else cause


@contextlib.contextmanager
def _peer_tmp(final: Path, suffix: str):
    """Rank 0's temporary folder, for the other ranks; their write failures are one-line errors too."""
    try:
        yield final.with_name(final.name + suffix)
    except OSError as e:
        raise write_error(final, e) from None


def _dcp_save(sd: dict[str, Any], tmp: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(sd, checkpoint_id=str(tmp / SHARDED_DIR))
    except CheckpointException as e:
        cause = _first_failure(e)
        if isinstance(cause, OSError):  # a full disk: reported (and the temporary removed) by atomic_path
            raise cause from None
        raise


def save_sharded(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 state: dict[str, Any], config: dict[str, Any], tokenizer: Any, keep: int, rank: int,
                 world_size: int) -> Path:
    """Write ``ckpt_root/step-XXXXXX`` from every process (a collective: all ranks call it)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = ckpt_root / f"step-{step:06d}"
    name = [f".tmp-{os.getpid()}"]  # rank 0's pid: the temporary's name is the same on every rank
    dist.broadcast_object_list(name, src=0)
    suffix = name[0]
    # An optimizer that never stepped (the step-0 checkpoint) has no state; DCP's get_*_state_dict
    # would create it by a zero-LR step, which advances Adam's step count: save the model only.
    with_optim = optimizer is not None and bool(optimizer.state)
    holder = atomic_path(final, is_dir=True, suffix=suffix) if rank == 0 else _peer_tmp(final, suffix)
    with holder as tmp:
        dist.barrier()  # rank 0 has created the temporary folder
        sd: dict[str, Any] = {"model": get_model_state_dict(model)}
        if with_optim:
            sd["optim"] = get_optimizer_state_dict(model, optimizer)
        _dcp_save(sd, tmp)
        ck._save_tensors(ck.rng_state(), tmp / _rng_file(rank))
        dist.barrier()  # every process's files are written (atomic_path fsyncs them all)
        if rank == 0:
            ck._kill_point("after-weights", step)
            (tmp / ck.CONFIG_FILE).write_text(json.dumps(config, indent=2))
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer")
            # state.json is written last: its presence marks a complete checkpoint.
            meta = {**state, "sharded": {"world_size": world_size, "optimizer": with_optim}, "step": step}
            (tmp / ck.STATE_FILE).write_text(json.dumps(meta, indent=2))
    if rank == 0:
        write_json_atomic(ckpt_root / "latest.json", {"step": step, "path": final.name}, suffix=suffix)
        ck._prune(ckpt_root, keep, protect=final)
    dist.barrier()  # no process reads or prunes checkpoints before rank 0 is done
    return final


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 rank: int = 0) -> dict[str, Any]:
    """Load a sharded checkpoint into ``model`` / ``optimizer`` (FSDP-sharded or not; a collective
    when a process group is up) and this rank's RNG state; returns its ``state.json``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    state = read_json(path / ck.STATE_FILE)
    info = state.get("sharded") or {}
    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    with_optim = optimizer is not None and bool(info.get("optimizer"))
    if with_optim:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    _dcp_load(sd, path, no_dist=not dist.is_initialized())
    set_model_state_dict(model, sd["model"])
    if with_optim:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    elif optimizer is not None:
        optimizer.state.clear()  # the checkpoint before the first step: Adam starts afresh
    rng = path / _rng_file(rank)
    if rng.is_file():
        from safetensors.torch import load_file

        ck.set_rng_state(load_file(str(rng)))
    else:
        log.warning("%s has no RNG state for rank %d (saved by %s processes); keeping this one's",
                    path, rank, info.get("world_size", "?"))
    return state


def _dcp_load(sd: dict[str, Any], path: Path, no_dist: bool) -> None:
    """``dcp.load`` of ``path/dcp`` into ``sd`` in place; a failure is a one-line FormatError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if not (path / SHARDED_DIR / ".metadata").is_file():  # DCP itself would log tracebacks first
        raise FormatError(f"{path}: the sharded checkpoint has no {SHARDED_DIR}/.metadata (incomplete or damaged)")
    try:
        with warnings.catch_warnings():  # DCP warns that a process without a group reads alone: meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=str(path / SHARDED_DIR), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # a BaseException: every rank's failures, wrapped
        cause = _first_failure(e)
        what = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise FormatError(f"{path}: cannot read the sharded checkpoint ({what})") from None


def resolve_sharded(path: str | Path) -> Path:
    """A sharded checkpoint folder itself, or the latest checkpoint of a run folder holding one."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"no such file or folder: {p}")
    found = p if (p / ck.STATE_FILE).is_file() else (
        ck.latest_checkpoint(p / "checkpoints") or ck.latest_checkpoint(p))
    if found is None:
        raise FormatError(f"{p} holds no tritlm checkpoint")
    if not is_sharded(found):
        raise FormatError(f"{found} is not a sharded (FSDP) checkpoint: it is already a single-folder one")
    return found


def full_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full model state dict, config.json) of a sharded checkpoint, read in this process alone."""
    from tritlm.model.config import ModelConfig
    from tritlm.model.transformer import Transformer

    path = Path(path)
    config = read_json(path / ck.CONFIG_FILE)
    try:
        mcfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise FormatError(f"{path}/config.json has no valid model config ({e})") from None
    # The model is only a template of names and shapes for DCP to fill; tied weights share a tensor.
    model = Transformer(mcfg)
    sd = {"model": model.state_dict()}
    _dcp_load(sd, path, no_dist=True)
    return ck.model_state_dict(model), config


def convert_sharded(src: str | Path, dst: str | Path) -> Path:
    """Write the single-folder checkpoint ``dst`` (model weights, config, tokenizer, state) from the
    sharded checkpoint ``src`` (a ``step-*`` folder or a run folder: its latest checkpoint).

    The optimizer state is not converted: ``dst`` is for packing, generation and evaluation.
    """
    src, dst = resolve_sharded(src), Path(dst)
    if dst.exists():
        raise ConfigError(f"{dst} exists; choose another destination")
    weights, config = full_model_state(src)
    state = read_json(src / ck.STATE_FILE)
    state.pop("sharded", None)
    with atomic_path(dst, is_dir=True) as tmp:
        ck._save_tensors(weights, tmp / ck.MODEL_FILE, metadata={"format": "pt"})
        (tmp / ck.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if (src / "tokenizer").is_dir():
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        (tmp / ck.STATE_FILE).write_text(json.dumps({**state, "converted_from": str(src)}, indent=2))
    return dst
