"""Loss-spike and NaN detection. The trainer rolls back to the last good checkpoint on a trip."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class SpikeDetector:
    """EMA of the loss and of its squared deviation; a loss far above both is a spike.

    Updated only with accepted losses, so a spike never raises its own threshold.
    """

    beta: float = 0.95
    sigma: float = 6.0
    ratio: float = 1.5
    warmup: int = 50
    ema: float = 0.0
    var: float = 0.0
    n: int = 0

    def check(self, loss: float) -> str | None:
        """Why ``loss`` must be rejected ('nan' / 'spike'), or None if it is fine."""
        if not math.isfinite(loss):
            return "nan"
        if self.n >= self.warmup:
            std = math.sqrt(max(self.var, 0.0))
            if loss > self.ema + self.sigma * std and loss > self.ratio * self.ema:
                return "spike"
        return None

    def update(self, loss: float) -> None:
        if self.n == 0:
            self.ema, self.var = loss, 0.0
        else:
            d = loss - self.ema
            self.ema += (1 - self.beta) * d
            self.var = self.beta * (self.var + (1 - self.beta) * d * d)
        self.n += 1

    def state(self) -> dict:
        return asdict(self)

    def load(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
