"""Read tritlm's own checkpoints (a run folder or one ``step-*`` folder) as an eval-mode model."""

from __future__ import annotations

from pathlib import Path

from tritlm.errors import ConfigError, FormatError
from tritlm.formats import checkpoint as ck
from tritlm.formats.sanity import check_finite, check_tensor_index
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (``--out`` of ``tritlm train``), its ``checkpoints`` folder, or a ``step-*`` folder."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"no such file or folder: {p}")
    if (p / ck.STATE_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = ck.latest_checkpoint(root)
        if found is not None:
            return found
    raise FormatError(f"{p} holds no tritlm checkpoint")


def is_native(path: str | Path) -> bool:
    try:
        resolve_checkpoint(path)
        return True
    except FormatError:
        return False


def load_native(path: str | Path):
    """(model, tokenizer, checkpoint folder) from a training checkpoint."""
    from tritlm.data import load_tokenizer

    ckpt = resolve_checkpoint(path)
    c = ck.read_checkpoint(ckpt)
    try:
        mcfg = ModelConfig.from_dict(c["config"]["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise FormatError(f"{ckpt}/config.json has no valid model config ({e})") from None
    # the config is checked against the weights file before a model of its size is built
    check_tensor_index(str(ckpt), mcfg, {k: v.shape for k, v in c["model"].items()})
    for k, v in c["model"].items():
        check_finite(str(ckpt), k, v)
    model = Transformer(mcfg)
    ck.load_model_state(model, c["model"], str(ckpt))
    model.eval()
    tok_dir = ckpt / "tokenizer"
    if not tok_dir.exists():
        raise FormatError(f"{ckpt} has no tokenizer folder")
    tok = load_tokenizer(tok_dir)
    want = c["config"].get("tokenizer_fingerprint")
    if want is not None and tok.fingerprint() != want:
        raise FormatError(f"{ckpt}: the tokenizer stored with it (fingerprint {tok.fingerprint()[:12]}) is not "
                          f"the one it was trained with ({str(want)[:12]})")
    return model, tok, ckpt
