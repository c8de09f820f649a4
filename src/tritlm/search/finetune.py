"""A short fine-tune of a searched configuration: ``tritlm finetune``'s Trainer with the source
model as ``finetune.source``, the spec as ``model.quant_overrides`` and distillation on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tritlm.train.config import TrainConfig, load_config


def finetune_config(source: str | Path, spec: dict[str, Any], steps: int, out_dir: str | Path,
                    data: str | Path | None, defaults: dict[str, Any],
                    overrides: list[str] | None = None) -> TrainConfig:
    """``defaults`` (``tritlm finetune``'s, see ``cli_finetune.FINETUNE_DEFAULTS``), then ``--set``
    style ``overrides``, then this run's source, spec, steps, folder and data."""
    direct: dict[str, Any] = {"finetune.source": str(source), "model.quant_overrides": spec, "max_steps": steps,
                              "out_dir": str(out_dir), "data.corpus": None if data is None else str(data),
                              # one evaluation and one checkpoint at the end of a short run
                              "eval_interval": steps, "ckpt_interval": steps}
    return load_config(None, overrides or [], base=defaults, **direct)


def run_finetune(cfg: TrainConfig, callback: Callable[[dict], None] | None = None) -> tuple[Any, Any]:
    """(TrainResult, the fine-tuned Transformer in eval mode, read back from its final checkpoint)."""
    from tritlm.formats.detect import load_transformer
    from tritlm.train.trainer import Trainer

    r = Trainer(cfg, callback).run()
    model, _, _ = load_transformer(r.checkpoint)
    return r, model.eval()
