#!/usr/bin/env bash
# Create .venv and install tritlm into it; safe to run any number of times.
# torch goes in first and pinned, so the editable install below never re-resolves it. Which index
# (and so which build: CPU or CUDA) it comes from is pip's own configuration (pip.conf,
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL), not this script's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${TRITLM_EXTRAS:-dev,serve,hf,gguf,eval,gpu}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q "torch>=2.3,<2.15"
fi
stamp=.venv/.tritlm-installed
# Reinstall only when the project definition changed: keeps a second run fast.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ "$(cat "$stamp")" != "$EXTRAS" ] || ! "$VPY" -c "import tritlm" >/dev/null 2>&1; then
  "$VPY" -m pip install -q -e ".[$EXTRAS]"
  echo "$EXTRAS" > "$stamp"
fi
