"""Size budgets: ``40MB`` / ``512KiB`` / ``1.5GB`` / ``123456`` (bytes) or bits per weight.

A budget counts the packed bytes of the block Linears only (levels + scales, what ``tritlm pack``
writes for them); embeddings, the LM head and norms are the same in every configuration, so they
are left out.
"""

from __future__ import annotations

import math
import re

from tritlm.errors import ConfigError

# SI units as the sizes users quote (llama.cpp's file sizes, "40 MB"); binary ones spelled KiB...
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_budget(text: str) -> int:
    """Bytes from ``40MB`` (10^6), ``40MiB`` (2^20), ``512KB``, ``2GB``, ``1234`` or ``1234B``."""
    m = _BUDGET.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"--budget {text!r}: expected a size such as 40MB, 512KB, 1.5GB, 300KiB or a byte count")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"--budget {text!r}: must be at least 1 byte")
    return int(value)


def budget_from_bpw(bpw: float, params: int) -> int:
    """Bytes of ``params`` weights at ``bpw`` bits each (scales and padding count against it)."""
    if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not math.isfinite(bpw) or bpw <= 0:
        raise ConfigError(f"--bpw must be a positive number of bits per weight, got {bpw!r}")
    return int(bpw * params / 8)


def format_bytes(n: float) -> str:
    """``1.23 MB`` in the SI units budgets are given in."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.3f} {unit}"
    return f"{int(n)} B"
