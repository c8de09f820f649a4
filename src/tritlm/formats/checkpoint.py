"""Checkpoints that lose nothing: safetensors + JSON, written atomically.

A checkpoint is a folder ``step-000500/`` holding ``model.safetensors``, ``optimizer.safetensors``,
``state.json`` (step, RNG, schedule state, stability state) and ``config.json`` (model + training
config), plus the tokenizer. It is first written as ``step-000500.tmp-<pid>/``; every file is
fsynced, the folder is renamed into place, and only then does ``latest`` (itself replaced
atomically) point at it. A process killed at any moment leaves either the previous checkpoint or
the new one, never a half-written folder that looks complete.

Re-saving a step moves the old folder aside (``step-000500.old.tmp-<pid>``) for the swap;
:func:`clean_partial` renames such a copy back when a kill left no ``step-000500``. Old checkpoints
are pruned by renaming them to a hidden ``.trash-step-000100-<pid>`` first (atomic), then deleting;
:func:`clean_partial` finishes deletions a kill interrupted. A full disk during a save is a
one-line :class:`tritlm.errors.DiskFullError` with the temporary removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tritlm.errors import FormatError
from tritlm.io_atomic import atomic_path, fsync_dir, recover_swap, write_json_atomic
from tritlm.safe_json import read_json

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step-(\d+)$")
OLD_RE = re.compile(r"^(step-\d+)\.old(\.tmp-\d+)$")
TRASH_PREFIX = ".trash-"
MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE = (
    "model.safetensors", "optimizer.safetensors", "state.json", "config.json")
SHARDED_DIR = "dcp"  # the tensors of an FSDP run's checkpoint (tritlm.formats.sharded)


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, with tied weights stored once (safetensors refuses shared storage)."""
    sd = model.state_dict()
    seen: dict[int, str] = {}
    out = {}
    for k, v in sd.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen[ptr] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    tied = {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise FormatError(f"{where}: weights do not fit the model ({first})") from None
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise FormatError(f"{where}: weights do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            key = f"state.{idx}.{name}"
            if torch.is_tensor(val):
                tensors[key] = val.detach().contiguous().cpu()
            else:
                scalars[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    for key, val in meta.get("scalars", {}).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(t: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in t:
        torch.set_rng_state(t["rng.cpu"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                    config: dict[str, Any], tokenizer: Any = None, keep: int = 2) -> Path:
    """Write ``ckpt_root/step-XXXXXX`` atomically, point ``latest`` at it, prune old ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    # Written as step-XXXXXX.tmp-<pid>/ (clean_partial removes those of killed runs); every file is
    # fsynced before the folder is renamed into place (replacing a re-saved step whole).
    with atomic_path(final, is_dir=True, suffix=f".tmp-{os.getpid()}") as tmp:
        _save_tensors(model_state_dict(model), tmp / MODEL_FILE, metadata={"format": "pt"})
        extra = {}
        if optimizer is not None:
            tensors, meta = optimizer_tensors(optimizer)
            tensors.update(rng_state())
            _save_tensors(tensors, tmp / OPTIM_FILE)
            extra["optimizer"] = meta
        _kill_point("after-weights", step)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        # state.json is written last: its presence marks a complete checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps({**state, **extra, "step": step}, indent=2))
    write_json_atomic(ckpt_root / "latest.json", {"step": step, "path": final.name}, suffix=f".tmp-{os.getpid()}")
    _prune(ckpt_root, keep, protect=final)
    return final


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file``, its I/O failures turned back into ``OSError`` (so a full disk is
    reported as one by :func:`tritlm.io_atomic.atomic_path`)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _kill_point(where: str, step: int) -> None:
    """Test hook: ``TRITLM_TEST_KILL_AT=after-weights[:STEP]`` SIGKILLs this process mid-checkpoint."""
    want = os.environ.get("TRITLM_TEST_KILL_AT", "")
    if want in (where, f"{where}:{step}"):
        log.warning("TRITLM_TEST_KILL_AT=%s: killing the process mid-checkpoint", where)
        os.kill(os.getpid(), 9)


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    out = [p for p in ckpt_root.iterdir()
           if p.is_dir() and STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(out, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; ``latest.json`` first, a folder scan if it is stale."""
    ptr = ckpt_root / "latest.json"
    if ptr.is_file():
        try:
            name = read_json(ptr)["path"]
            # a plain step-* name inside this folder: anything else is a corrupt pointer
            if isinstance(name, str) and STEP_RE.match(name) and (ckpt_root / name / STATE_FILE).is_file():
                return ckpt_root / name
        except (FormatError, KeyError, TypeError):
            log.warning("%s is unreadable; scanning for checkpoints", ptr)
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def clean_partial(ckpt_root: Path) -> None:
    """Tidy up after a process killed mid-save or mid-prune (call with the run lock held).

    A re-saved step's moved-aside copy (``step-N.old.tmp-<pid>``) is renamed back if the kill left
    no ``step-N``; then ``*.tmp-*`` temporaries and ``.trash-*`` folders of interrupted prunes are
    removed. A complete checkpoint under its own name is never touched."""
    if not ckpt_root.is_dir():
        return
    for p in sorted(ckpt_root.iterdir()):
        m = OLD_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            recover_swap(ckpt_root / m.group(1), m.group(2))
    for p in ckpt_root.iterdir():
        if STEP_RE.match(p.name):
            continue
        if ".tmp-" in p.name or p.name.startswith(TRASH_PREFIX):
            log.info("removing partial checkpoint %s", p.name)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _prune(ckpt_root: Path, keep: int, protect: Path) -> None:
    if keep <= 0:
        return
    done = complete_checkpoints(ckpt_root)
    for p in done[:-keep]:
        if p != protect:
            remove_checkpoint(p)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves it whole or gone from view:
    renamed to a hidden ``.trash-*`` name first (atomic), then deleted."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
        fsync_dir(path.parent)
    except OSError as e:
        log.warning("could not prune %s: %s", path, e)
        return
    _prune_point()
    shutil.rmtree(trash, ignore_errors=True)


def _prune_point() -> None:
    """Test hook between the rename and the deletion of a pruned checkpoint."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint folder into plain dicts; every failure is a one-line FormatError."""
    path = Path(path)
    if (path / SHARDED_DIR).is_dir() and not (path / MODEL_FILE).is_file():
        raise FormatError(f"{path} is a sharded (FSDP) checkpoint; make a single-folder one first: "
                          f"tritlm checkpoint-convert {path} DST")
    if not (path / STATE_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise FormatError(f"{path} is not a complete tritlm checkpoint (no {STATE_FILE}/{MODEL_FILE})")
    state, config = read_json(path / STATE_FILE), read_json(path / CONFIG_FILE)
    try:
        model = load_file(str(path / MODEL_FILE))
        optim = load_file(str(path / OPTIM_FILE)) if (path / OPTIM_FILE).is_file() else {}
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: corrupt weights file ({e})") from None
    return {"state": state, "config": config, "model": model, "optim": optim, "path": path}
