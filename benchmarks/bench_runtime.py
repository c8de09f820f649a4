"""CPU runtime benchmark: same as ``tritlm bench`` (packed vs dense PyTorch fp32/bf16 and, when
llama-cpp-python is installed, llama.cpp TQ2_0 on the same weights; 700M and 125M).

    .venv/bin/python benchmarks/bench_runtime.py [--tune] [--json] [--models 700M,125M] [--threads 1,2]

Results of one run are recorded in benchmarks/RESULTS.md, section "CPU runtime".
"""

from __future__ import annotations

import sys

from tritlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
