"""The chosen configuration as a per-layer spec file (``--quant-spec`` of ``tritlm pack``,
``export``, ``finetune``, ``train``): every block Linear named exactly, so the file means the same
whatever default kind the reading command starts from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tritlm.io_atomic import write_text_atomic
from tritlm.search.units import Option, Unit


def spec_dict(units: Sequence[Unit], options: Sequence[Option], picks: Sequence[int]) -> dict[str, dict[str, Any]]:
    """``{layer name: quant fields}`` in model order."""
    return {n: options[j].spec_fields() for u, j in zip(units, picks, strict=True) for n in u.linears}


def spec_text(spec: dict[str, dict[str, Any]], header: Sequence[str] = ()) -> str:
    """YAML with one flow mapping a line (``"layers.0.mlp.up_proj": {weight: int4, ...}``)."""
    lines = [f"# {h}" for h in header]
    for name, fields in spec.items():
        body = ", ".join(f"{k}: {v}" for k, v in fields.items())  # kind names and integers only
        lines.append(f'"{name}": {{{body}}}')
    return "\n".join(lines) + "\n"


def write_spec(path: str | Path, spec: dict[str, dict[str, Any]], header: Sequence[str] = ()) -> Path:
    """Write the spec atomically; returns the path."""
    p = Path(path)
    if p.parent != Path("."):
        p.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(p, spec_text(spec, header))
    return p
