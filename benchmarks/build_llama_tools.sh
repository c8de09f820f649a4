#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, llama-server, llama-perplexity): the peers a llama.cpp
# user runs, for `tritlm bench`, benchmarks/bench_serve.py and the perplexity cross-checks.
# Offline apart from the package registry: the sources are the llama.cpp tree inside the
# llama-cpp-python source package (the version installed in .venv when there is one). About 10
# minutes on 2 cores the first time; later runs find the binaries and exit at once.
# Prints the folder that holds the binaries (also what `tritlm bench` looks in by default).
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${VPY:-.venv/bin/python}
VER=$("$VPY" -c "import llama_cpp; print(llama_cpp.__version__)" 2>/dev/null || echo "")
ROOT=${TRITLM_LLAMA_CPP_HOME:-$HOME/.cache/tritlm/llama.cpp${VER:+-$VER}}
BIN="$ROOT/build/bin"
TOOLS=(llama-bench llama-server llama-perplexity)
have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi
mkdir -p "$ROOT"
if [ ! -f "$ROOT/src/CMakeLists.txt" ]; then
  tmp=$(mktemp -d)
  "$VPY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$tmp" \
    "llama-cpp-python${VER:+==$VER}" >&2
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$ROOT/src"
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$ROOT/src"
  rm -rf "$tmp"
fi
cmake -S "$ROOT/src" -B "$ROOT/build" -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_TESTS=OFF >&2
cmake --build "$ROOT/build" --target "${TOOLS[@]}" -j "$(nproc)" >&2
have_all
echo "$BIN"
