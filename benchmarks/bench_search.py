"""Per-layer bit-width search on the fine-tuning teacher (benchmarks/RESULTS.md, "Per-layer
bit-width search").

The Pareto curve (packed block-Linear bytes vs held-out perplexity, `tritlm eval`'s hf protocol
at ctx 128 over the first --eval-tokens tokens) of searched mixes against every uniform kind and
random mixes of the same size; at uniform ternary's size + 10%: the searched mix against uniform
ternary, before and after a short distilled fine-tune (`tritlm finetune`'s recipe, --ft-steps
each); both packed, decoded by the packed CPU runtime and by llama.cpp from our GGUF.

    PYTHONPATH=src python benchmarks/bench_search.py --teacher runs/bench-finetune/teacher-hf \\
        --train runs/bench-finetune/train.txt --heldout runs/bench-finetune/heldout.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from tritlm.cli_finetune import FINETUNE_DEFAULTS
from tritlm.eval.perplexity import perplexity, read_eval_ids
from tritlm.formats.detect import load_transformer
from tritlm.search.budget import format_bytes
from tritlm.search.finetune import finetune_config, run_finetune
from tritlm.search.pareto import pareto_points, pareto_table, write_pareto
from tritlm.search.plan import Problem, choose
from tritlm.search.sensitivity import calib_loss, measured_sensitivity
from tritlm.search.spec import spec_dict, write_spec
from tritlm.search.units import block_params, make_units, parse_options, size_table

log = logging.getLogger("bench_search")
CTX = 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--train", required=True, help="calibration (its first tokens) and fine-tuning text")
    p.add_argument("--heldout", required=True)
    p.add_argument("--out", default="benchmarks/results/search")
    p.add_argument("--work", default="/tmp/bench-search", help="fine-tune runs and packed folders")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--units", default="qkv")
    p.add_argument("--random", type=int, default=2)
    p.add_argument("--ft-steps", type=int, default=60, help="0: skip the fine-tunes")
    p.add_argument("--ft-chars", type=int, default=300_000, help="fine-tune on the first N characters of --train")
    p.add_argument("--no-runtime", action="store_true", help="skip packing and the decode speeds")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    model, tok, _ = load_transformer(a.teacher)
    model = model.float().eval()
    cfg = model.cfg
    calib = torch.as_tensor(read_eval_ids(a.train, tok)[: a.calib_tokens])
    held = torch.as_tensor(read_eval_ids(a.heldout, tok)[: a.eval_tokens])

    def ppl(m) -> float:  # `tritlm eval MODEL --data heldout --ctx 128 --max-tokens N` (hf protocol)
        return perplexity(m, held, protocol="hf", ctx=CTX, batch_size=16).ppl

    units = make_units(cfg, a.units)
    options = parse_options("binary,ternary,int4,int8,fp16")
    sizes = size_table(cfg, units, options)
    sens = measured_sensitivity(model, calib, units, options, CTX,
                                progress=lambda d, n: log.info("sensitivity %d/%d", d, n) if d % 10 == 0 else None)
    problem = Problem(tuple(units), tuple(options), sizes, sens)
    t_sens = time.time() - t0
    uni = {o.name: problem.nbytes(problem.uniform(j)) for j, o in enumerate(options)}
    tern = uni["ternary"]
    key_budget = int(1.1 * tern)
    budgets = sorted({uni["binary"], tern, key_budget, int(1.25 * tern), uni["int4"], uni["int8"]})
    pts = pareto_points(problem, model, budgets, ppl, n_random=a.random,
                        progress=lambda d, n: log.info("pareto %d/%d", d, n))
    write_pareto(pts, out, title="teacher 4x256: searched mixes vs uniform kinds vs random mixes",
                 loss_name="held-out ppl")
    fp_ppl = ppl(model)

    dp, greedy = choose(problem, key_budget)
    mix_model = problem.model(model, dp.picks)
    tern_picks = problem.uniform(1)
    res: dict = {
        "teacher": a.teacher, "calib_tokens": int(calib.numel()), "eval_tokens": int(held.numel()), "ctx": CTX,
        "units": a.units, "block_params": block_params(cfg), "sensitivity_s": t_sens, "fp_ppl": fp_ppl,
        "uniform_bytes": uni, "key_budget": key_budget,
        "mix": {"bytes": dp.bytes, "bpw": 8 * dp.bytes / block_params(cfg), "choice": problem.labels(dp.picks),
                "predicted_calib": problem.predicted(dp.picks), "measured_calib": calib_loss(mix_model, calib, CTX),
                "ppl": ppl(mix_model)},
        "greedy": {"bytes": greedy.bytes, "ppl": ppl(problem.model(model, greedy.picks)),
                   "predicted_calib": problem.predicted(greedy.picks)},
        "ternary": {"bytes": tern, "ppl": next(p.loss for p in pts if p.label == "uniform ternary"),
                    "predicted_calib": problem.predicted(tern_picks),
                    "measured_calib": calib_loss(problem.model(model, tern_picks), calib, CTX)},
        "base_calib": sens.base_loss,
    }
    specs = {"mix": spec_dict(problem.units, problem.options, dp.picks),
             "ternary": spec_dict(problem.units, problem.options, tern_picks)}
    for name, spec in specs.items():
        write_spec(work / f"{name}.yaml", spec, [f"bench_search: {name} at {format_bytes(res[name]['bytes'])}"])
    log.info("mix at ternary+10%%: ppl %.3f vs uniform ternary %.3f", res["mix"]["ppl"], res["ternary"]["ppl"])

    if a.ft_steps:
        ft_data = work / "ft-data.txt"  # a slice: the Trainer tokenises all of its corpus first
        ft_data.write_text(Path(a.train).read_text()[: a.ft_chars])
        for name, spec in specs.items():
            t = time.time()
            fcfg = finetune_config(a.teacher, spec, a.ft_steps, work / f"ft-{name}", ft_data, FINETUNE_DEFAULTS,
                                   [f"threads={a.threads}", "eval_batches=4"])
            r, ft_model = run_finetune(fcfg)
            res[name]["ft_ppl"] = ppl(ft_model)
            res[name]["ft_steps"] = r.steps
            res[name]["ft_s"] = time.time() - t
            log.info("%s fine-tuned %d steps: ppl %.3f (%.0f s)", name, r.steps, res[name]["ft_ppl"], time.time() - t)
    if not a.no_runtime:
        res["runtime"] = _runtime(a, specs, work)
    res["wall_s"] = time.time() - t0
    (out / "search.json").write_text(json.dumps(res, indent=2))
    print(pareto_table(pts, "held-out ppl"))
    print(json.dumps({k: v for k, v in res.items() if k != "runtime"}, indent=2))
    print(json.dumps(res.get("runtime"), indent=2))


def _runtime(a, specs: dict, work: Path) -> dict:
    """Pack each spec from the teacher and decode it: packed CPU runtime and llama.cpp (our GGUF)."""
    from tritlm.formats.packed import pack_model
    from tritlm.infer.profile import bench_model

    out = {}
    for name, spec in specs.items():
        folder = work / f"packed-{name}"
        _, rep = pack_model(a.teacher, folder, quant_spec=spec, overwrite=True)
        try:
            b = bench_model(str(folder), threads_list=(a.threads,), decode_tokens=64, prompt_tokens=64, dense=False,
                            head="f16")
        except Exception as e:  # noqa: BLE001 - a missing llama.cpp or a kind its GGUF cannot hold: say so, keep the rest
            log.warning("bench %s failed: %s", name, e)
            b = {"error": str(e)}
        out[name] = {"block_linear_bytes": rep["ternary_bytes"] + rep["fp_linear_bytes"], "bench": b}
    return out


if __name__ == "__main__":
    main()
