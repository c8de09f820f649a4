"""Ternary vs full precision on equal terms: same data, seed, budget; each at its best LR.

Writes ``compare.md`` (table), ``compare.json`` (every run) and ``compare.png`` (validation-loss
curves of each model at its best LR).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritlm.train.config import TrainConfig
from tritlm.train.trainer import Trainer, TrainResult


@dataclass
class Run:
    name: str
    lr: float
    result: TrainResult
    seed: int = 0


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


@dataclass
class Comparison:
    runs: list[Run]
    out_dir: Path
    plot_path: Path | None = None
    table_path: Path | None = None
    best: dict[str, Run] = field(default_factory=dict)

    def groups(self) -> dict[tuple[str, float], list[Run]]:
        """Runs by (variant, LR): one per seed."""
        out: dict[tuple[str, float], list[Run]] = {}
        for r in self.runs:
            out.setdefault((r.name, r.lr), []).append(r)
        return out

    def table_markdown(self) -> str:
        if len({r.seed for r in self.runs}) > 1:
            return self._seeds_markdown()
        lines = ["| model | lr | val loss (full split) | train loss | ms/step | params | best |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.runs:
            star = "yes" if self.best.get(r.name) is r else ""
            res = r.result
            lines.append(f"| {r.name} | {r.lr:g} | {res.val_loss:.4f} | {res.train_loss:.4f} | "
                         f"{res.step_ms:.1f} | {res.params:,} | {star} |")
        if "ternary" in self.best and "fp" in self.best:
            t, f = self.best["ternary"].result, self.best["fp"].result
            lines.append("")
            lines.append(f"gap at best LRs (ternary - fp): {t.val_loss - f.val_loss:+.4f}; "
                         f"step time ternary / fp: {t.step_ms / f.step_ms:.2f}x")
        for small, big in (("fp-equal-bytes", "ternary"), ("fp", "ternary-wide")):
            if small in self.best and big in self.best:
                d = self.best[big].result.val_loss - self.best[small].result.val_loss
                lines.append(f"equal weight bytes ({big} - {small}): {d:+.4f}")
        return "\n".join(lines)


    def _seeds_markdown(self) -> str:
        """Mean and sample standard deviation over seeds; the gap is paired seed by seed."""
        lines = ["| model | lr | seeds | val loss mean | std | per seed | best |", "|---|---|---|---|---|---|---|"]
        for (name, lr), runs in self.groups().items():
            vals = [r.result.val_loss for r in runs]
            m, sd = _mean_std(vals)
            star = "yes" if self.best.get(name) in runs else ""
            lines.append(f"| {name} | {lr:g} | {len(runs)} | {m:.4f} | {sd:.4f} | "
                         f"{', '.join(f'{v:.4f}' for v in vals)} | {star} |")
        if "ternary" in self.best and "fp" in self.best:
            g = self.groups()
            t = {r.seed: r.result.val_loss for r in g[("ternary", self.best["ternary"].lr)]}
            f = {r.seed: r.result.val_loss for r in g[("fp", self.best["fp"].lr)]}
            gaps = [t[k] - f[k] for k in sorted(t) if k in f]
            m, sd = _mean_std(gaps)
            lines += ["", f"gap at best LRs (ternary - fp), paired over {len(gaps)} seeds: {m:+.4f} "
                          f"(std {sd:.4f}, range {min(gaps):+.4f} .. {max(gaps):+.4f})"]
        return "\n".join(lines)


def equal_bytes_fp_model(cfg: TrainConfig, vocab_size: int) -> dict[str, Any]:
    """Model overrides for the widest FP twin whose fp16 weights fit in the ternary model's packed
    bytes (2 bits per ternary weight + fp16 embeddings and norms): "ternary vs FP at equal memory"."""
    from tritlm.model.sizes import model_sizes
    from tritlm.train.trainer import resolve_model_config

    tern = resolve_model_config(dataclasses.replace(cfg, fp=False), vocab_size)
    budget = model_sizes(tern).packed_bytes
    step = 2 * tern.n_heads  # keeps the head dim even for RoPE
    best = None
    for dim in range(step, tern.dim + 1, step):
        ffn = max(8, int(round(8 * dim / 3 / 4)) * 4)
        m = dataclasses.replace(tern, dim=dim, ffn_dim=ffn).fp_twin()
        if model_sizes(m).fp16_bytes <= budget:
            best = {"dim": dim, "ffn_dim": ffn}
    if best is None:
        raise ValueError("no FP model fits in the ternary model's packed bytes")
    return best


def wide_ternary_model(cfg: TrainConfig, vocab_size: int) -> dict[str, Any]:
    """Model overrides for the widest ternary model (same depth and heads) whose packed bytes fit in
    the FP twin's fp16 weight bytes: the other reading of "ternary vs FP at equal memory"."""
    from tritlm.model.sizes import model_sizes
    from tritlm.train.trainer import resolve_model_config

    tern = resolve_model_config(dataclasses.replace(cfg, fp=False), vocab_size)
    budget = model_sizes(tern.fp_twin()).fp16_bytes
    step = 2 * tern.n_heads
    best = None
    dim = tern.dim
    while True:
        ffn = max(8, int(round(8 * dim / 3 / 4)) * 4)
        if model_sizes(dataclasses.replace(tern, dim=dim, ffn_dim=ffn)).packed_bytes > budget:
            break
        best = {"dim": dim, "ffn_dim": ffn}
        dim += step
    if best is None:
        raise ValueError("the ternary model does not fit in its FP twin's bytes")
    return best


def compare(cfg: TrainConfig, lrs: list[float] | None = None, out_dir: Path | None = None,
            variants: dict[str, dict[str, Any]] | None = None,
            callback_factory: Callable[[str], Callable] | None = None,
            variant_lrs: dict[str, list[float]] | None = None, seeds: list[int] | None = None) -> Comparison:
    """Train each variant (default: ``ternary`` and its FP twin ``fp``) at every LR in ``lrs``.

    ``variants`` maps a name to TrainConfig field overrides (e.g. {"fp": {"fp": True}}), which
    lets a benchmark add, say, a wider ternary model with the FP model's weight bytes;
    ``variant_lrs`` gives a variant its own sweep (an expensive one can try fewer LRs). With
    several ``seeds`` every (variant, LR) is trained once per seed and judged by its mean.
    """
    out = Path(out_dir or cfg.out_dir)
    variants = variants or {"ternary": {"fp": False}, "fp": {"fp": True}}
    lrs = lrs or [cfg.optim.lr]
    seeds = seeds or [cfg.seed]
    runs: list[Run] = []
    for name, over in variants.items():
        for lr in (variant_lrs or {}).get(name, lrs):
            for seed in seeds:
                tag = f"{name}-lr{lr:g}" + (f"-seed{seed}" if len(seeds) > 1 else "")
                c = dataclasses.replace(cfg, out_dir=str(out / tag), seed=seed,
                                        optim=dataclasses.replace(cfg.optim, lr=lr), **over)
                cb = callback_factory(f"{name} lr {lr:g} seed {seed}") if callback_factory else None
                runs.append(Run(name, lr, Trainer(c, cb).run(), seed))
    comp = Comparison(runs, out)
    best_mean: dict[str, float] = {}
    for (name, _lr), group in comp.groups().items():
        m = _mean_std([r.result.val_loss for r in group])[0]
        if name not in best_mean or m < best_mean[name]:
            best_mean[name], comp.best[name] = m, group[0]
    out.mkdir(parents=True, exist_ok=True)
    comp.table_path = out / "compare.md"
    comp.table_path.write_text(comp.table_markdown() + "\n")
    (out / "compare.json").write_text(json.dumps([
        {"name": r.name, "lr": r.lr, "seed": r.seed, "val_loss": r.result.val_loss, "train_loss": r.result.train_loss,
         "step_ms": r.result.step_ms, "params": r.result.params, "val_history": r.result.val_history}
        for r in runs], indent=2))
    comp.plot_path = plot_curves(comp, out / "compare.png")
    return comp


def plot_curves(comp: Comparison, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in comp.best.items():
        hist = r.result.val_history
        ax.plot([s for s, _ in hist], [v for _, v in hist], marker="o", ms=3,
                label=f"{name} (lr {r.lr:g}): {r.result.val_loss:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (full split)")
    ax.set_title("ternary vs full precision, each at its best LR")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
