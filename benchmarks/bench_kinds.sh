#!/usr/bin/env bash
# Per-layer kinds benchmark (benchmarks/RESULTS.md "Per-layer kinds"): the pure-ternary 700M bench
# before / after a change, interleaved on the same machine (the boxes are shared and noisy: compare
# medians of pairs, not single runs), plus mixed models against llama.cpp on the same mixed GGUF.
#   bash benchmarks/bench_kinds.sh BEFORE_COMMIT [PAIRS]
# Needs llama-cpp-python in .venv (scripts/setup_llama_cpp.sh). Writes /tmp/tritlm-bench-kinds/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?usage: bench_kinds.sh BEFORE_COMMIT [PAIRS]}
PAIRS=${2:-4}
V=$PWD/.venv/bin/python
OUT=/tmp/tritlm-bench-kinds
WT=$OUT/before-tree
mkdir -p "$OUT"
[ -d "$WT" ] || git worktree add -q "$WT" "$BEFORE"
B=(-m tritlm bench --models 700M --threads 1,2 --no-dense --json)
"$V" "${B[@]}" --quant-spec configs/quant/attn-int8.yaml > "$OUT/mixed-attn-int8.json"
for i in $(seq 1 "$PAIRS"); do
  (cd "$OUT" && PYTHONPATH="$WT/src" "$V" "${B[@]}") > "$OUT/before$i.json"
  "$V" "${B[@]}" > "$OUT/after$i.json"
done
"$V" - "$OUT" "$PAIRS" <<'PY'
import json, statistics as st, sys
out, n = sys.argv[1], int(sys.argv[2])
for tag in ("before", "after"):
    rat = {}
    for i in range(1, n + 1):
        for q in json.load(open(f"{out}/{tag}{i}.json"))["models"][0]["ratios"]:
            rat.setdefault(q["threads"], []).append((q["decode"], q["prefill"]))
    for th, v in sorted(rat.items()):
        print(f"{tag:6} threads {th}: vs llama.cpp decode {st.median(d for d, _ in v):.2f}x "
              f"prefill {st.median(p for _, p in v):.2f}x (median of {len(v)})")
PY
