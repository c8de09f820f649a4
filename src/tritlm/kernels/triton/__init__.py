"""Triton kernels for CUDA (and, slowly, for CPU tensors under ``TRITON_INTERPRET=1``).

Each kernel module sits beside a plain torch reference of the same math (``layout.py`` for the
GPU weight layout). ``triton`` is the ``[gpu]`` extra; nothing here is imported by the CPU paths.
"""

from __future__ import annotations

import importlib.util
import os

from tritlm.errors import TritlmError


def available() -> bool:
    """True when ``triton`` is importable."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require(device_type: str) -> None:
    """Raise a one-line error when the Triton kernels cannot run on ``device_type`` tensors."""
    if not available():
        raise TritlmError("the Triton kernels need the triton package: pip install 'tritlm[gpu]'")
    if device_type != "cuda" and not interpreting():
        raise TritlmError(f"the Triton kernels run on CUDA tensors, or on {device_type} tensors only under "
                          "TRITON_INTERPRET=1 (set before tritlm is imported)")
