"""Training metrics: throughput, MFU, and logs to CSV and TensorBoard (rank 0 only)."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s of common GPUs, for MFU. CPUs are measured instead (see measure_peak_flops).
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40": 181e12, "L20": 119e12,
                  "4090": 165e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def measure_peak_flops(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    """Peak FLOP/s for MFU: a table value for known GPUs, else a timed fp32 matmul on this device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class MetricsLogger:
    """Appends rows to ``metrics.csv`` and scalars to TensorBoard; a no-op on ranks > 0."""

    FIELDS = ["step", "split", "loss", "lr", "wd", "grad_norm", "tokens_per_s", "mfu", "step_ms",
              "event"]

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True, resume: bool = False):
        self.enabled = enabled
        self.tb = None
        self._f = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.csv"
        new = not (resume and path.exists())
        self._f = open(path, "w" if new else "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.FIELDS)
        if new:
            self._w.writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                log.warning("tensorboard is not installed; logging to CSV only")

    def log(self, step: int, split: str, **values: Any) -> None:
        if not self.enabled:
            return
        self._w.writerow({"step": step, "split": split, **values})
        self._f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v == v:
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self.tb is not None:
            self.tb.close()
