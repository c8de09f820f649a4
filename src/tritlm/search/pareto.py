"""Bytes vs loss of searched configurations at several budgets, against every uniform
configuration and against random configurations of the same size: points, a table, a PNG."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tritlm.errors import ConfigError
from tritlm.model.transformer import Transformer
from tritlm.search.budget import format_bytes
from tritlm.search.knapsack import solve_dp
from tritlm.search.plan import LossFn, Problem

log = logging.getLogger(__name__)

# Random configurations count as "the same size" when within this fraction below the pick's bytes.
SAME_SIZE = 0.05


@dataclass(frozen=True)
class Point:
    label: str
    kind: str  # searched | uniform | random
    bytes: int
    loss: float
    predicted: float
    budget: int | None = None
    mix: str = ""  # how many units took each option, e.g. "ternary 20, int8 8"


def mix_text(problem: Problem, picks: Sequence[int]) -> str:
    counts = np.bincount(np.asarray(picks), minlength=len(problem.options))
    return ", ".join(f"{o.name} {c}" for o, c in zip(problem.options, counts) if c)


def random_same_size(sizes: np.ndarray, lo: int, hi: int, n: int, rng: np.random.Generator,
                     draws: int = 20000) -> list[tuple[int, ...]]:
    """Up to ``n`` distinct configurations drawn uniformly (each unit an option at random) whose bytes
    lie in ``[lo, hi]`` (rejection sampling over ``draws`` draws)."""
    u, o = sizes.shape
    cand = rng.integers(0, o, size=(draws, u))
    tot = sizes[np.arange(u), cand].sum(axis=1)
    ok = cand[(tot >= lo) & (tot <= hi)]
    out: list[tuple[int, ...]] = []
    for row in ok:
        t = tuple(int(x) for x in row)
        if t not in out:
            out.append(t)
        if len(out) == n:
            break
    return out


def budget_grid(problem: Problem, n: int = 6) -> list[int]:
    """``n`` budgets spaced geometrically from the smallest to the largest configuration."""
    lo = int(problem.sizes.min(axis=1).sum())
    hi = int(problem.sizes.max(axis=1).sum())
    return sorted({int(round(x)) for x in np.geomspace(lo, hi, n)})


def pareto_points(problem: Problem, model: Transformer, budgets: Sequence[int], loss: LossFn,
                  n_random: int = 3, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> list[Point]:
    """Measure (``loss``) the DP pick at each budget, each uniform configuration and ``n_random``
    random configurations of each pick's size (bytes within :data:`SAME_SIZE` below it, not above
    the budget)."""
    rng = np.random.default_rng(seed)
    jobs: list[tuple[str, str, tuple[int, ...], int | None]] = []
    for j, o in enumerate(problem.options):
        jobs.append((f"uniform {o.name}", "uniform", problem.uniform(j), None))
    for b in sorted(set(budgets)):
        try:
            pk = solve_dp(problem.sens.delta, problem.sizes, b)
        except ConfigError as e:  # a budget below the smallest configuration: nothing to plot there
            log.info("pareto: budget %d skipped (%s)", b, e)
            continue
        jobs.append((f"searched {format_bytes(b)}", "searched", pk.picks, b))
        lo = int(pk.bytes * (1 - SAME_SIZE))
        for r in random_same_size(problem.sizes, lo, b, n_random, rng):
            jobs.append((f"random {format_bytes(b)}", "random", r, b))
    pts = []
    for i, (label, kind, picks, b) in enumerate(jobs):
        pts.append(Point(label, kind, problem.nbytes(picks), loss(problem.model(model, picks)),
                         problem.predicted(picks), b, mix_text(problem, picks)))
        if progress is not None:
            progress(i + 1, len(jobs))
    return pts


def pareto_table(points: Sequence[Point], loss_name: str = "loss") -> str:
    """A Markdown table, sorted by bytes."""
    rows = ["| configuration | bytes | " + loss_name + " | predicted | mix |", "|---|---:|---:|---:|---|"]
    for p in sorted(points, key=lambda p: (p.bytes, p.kind)):
        rows.append(f"| {p.label} | {format_bytes(p.bytes)} | {p.loss:.4f} | {p.predicted:.4f} | {p.mix} |")
    return "\n".join(rows) + "\n"


def plot_pareto(points: Sequence[Point], path: str | Path, title: str = "", loss_name: str = "loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"searched": ("o", "tab:blue"), "uniform": ("s", "tab:red"), "random": ("x", "tab:gray")}
    for kind, (marker, color) in style.items():
        ps = sorted((p for p in points if p.kind == kind), key=lambda p: p.bytes)
        if ps:
            ax.plot([p.bytes / 1e6 for p in ps], [p.loss for p in ps], marker, color=color, label=kind,
                    linestyle="-" if kind == "searched" else "none")
    for p in points:
        if p.kind == "uniform":
            ax.annotate(p.label.split()[-1], (p.bytes / 1e6, p.loss), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("packed block-Linear bytes (MB, scales included)")
    ax.set_ylabel(loss_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def write_pareto(points: Sequence[Point], out_dir: str | Path, title: str = "",
                 loss_name: str = "loss") -> dict[str, Path]:
    """``pareto.md``, ``pareto.csv`` and ``pareto.png`` in ``out_dir``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pareto.md").write_text(pareto_table(points, loss_name))
    with open(d / "pareto.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        w.writeheader()
        for p in points:
            w.writerow(asdict(p))
    png = plot_pareto(points, d / "pareto.png", title, loss_name)
    return {"md": d / "pareto.md", "csv": d / "pareto.csv", "png": png}
