"""A small model registry: a JSON file mapping names to model paths, so commands take a name or a path.

The file is ``$TRITLM_MODELS`` when set, else ``~/.config/tritlm/models.json``:
``{"models": {"shakespeare": "/abs/path/to/packed"}}``. A name that is also an existing path is
read as the path (paths win, so a folder named like a model is never shadowed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tritlm.errors import TritlmError
from tritlm.io_atomic import write_json_atomic

log = logging.getLogger(__name__)


def registry_file() -> Path:
    env = os.environ.get("TRITLM_MODELS")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tritlm" / "models.json"


def list_models() -> dict[str, str]:
    f = registry_file()
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise TritlmError(f"model registry {f} is unreadable ({e})") from None
    models = data.get("models", {}) if isinstance(data, dict) else {}
    return {str(k): str(v) for k, v in models.items()}


def _write(models: dict[str, str]) -> None:
    # atomic replace: a crash never leaves half a registry
    write_json_atomic(registry_file(), {"models": models}, indent=2, sort_keys=True)


def register(name: str, path: str | Path) -> None:
    if not name or "/" in name or os.sep in name:
        raise TritlmError(f"invalid model name {name!r} (no slashes)")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise TritlmError(f"no such file or folder: {p}")
    models = list_models()
    models[name] = str(p)
    _write(models)


def unregister(name: str) -> None:
    models = list_models()
    if name not in models:
        raise TritlmError(f"no model named {name!r} in {registry_file()}")
    del models[name]
    _write(models)


def resolve_path(name_or_path: str | Path) -> Path:
    """An existing path as is; otherwise a registered name's path; otherwise the path (callers report)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p.is_file() or p.is_dir()):  # a FIFO, socket or device: reading it could block for ever
            raise TritlmError(f"{p} is not a regular file or folder")
        return p
    models = list_models()
    if str(name_or_path) in models:
        return Path(models[str(name_or_path)])
    return p
