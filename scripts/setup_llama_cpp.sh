#!/usr/bin/env bash
# Install llama-cpp-python into .venv, built from its source package (no prebuilt binary can be
# fetched here). The first build takes ~10 minutes on 2 cores; pip caches the built wheel, so later
# runs (and later CI runs on the same machine) install it in seconds. Safe to run any number of
# times. A failure is reported and leaves the test run to skip the llama.cpp cross-checks.
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
if "$VPY" -c "import llama_cpp" >/dev/null 2>&1; then
  exit 0
fi
"$VPY" -m pip install -q scikit-build-core cmake ninja || { echo "setup_llama_cpp: build tools not installable; llama.cpp tests will skip" >&2; exit 0; }
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
# --no-binary keeps pip on the source package; the wheel it builds goes to pip's cache.
if ! "$VPY" -m pip install -q --no-build-isolation --no-binary llama-cpp-python "llama-cpp-python>=0.3,<0.4"; then
  echo "setup_llama_cpp: building llama-cpp-python failed; llama.cpp tests will skip" >&2
fi
exit 0
