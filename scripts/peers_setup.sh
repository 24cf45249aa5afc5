#!/usr/bin/env bash
# Install the benchmark peers (llama.cpp via llama-cpp-python, mistral.rs via PyPI `mistralrs`)
# into their own venv, outside the repo, for scripts/bench.py. Not a runtime dependency.
#   bash scripts/peers_setup.sh            # venv at ~/.cache/mistralrs-cli/peers
#   PEERS=/some/dir bash scripts/peers_setup.sh
# llama-cpp-python ships only as source: the build takes ~5 minutes on 2 cores. GGML_NATIVE is off
# and AMX disabled on purpose: some VMs advertise AMX without granting the tile state, and a
# native build then segfaults.
set -euo pipefail
PEERS="${PEERS:-$HOME/.cache/mistralrs-cli/peers}"
PY="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
MISTRALRS_VERSION="${MISTRALRS_VERSION:-0.9.5}"

[ -x "$PEERS/bin/python" ] || "$PY" -m venv "$PEERS"
PIP="$PEERS/bin/pip"

# AVX-512 only where this CPU has it: a build with it dies with "Illegal instruction" elsewhere
AVX512=OFF
grep -qw avx512f /proc/cpuinfo 2>/dev/null && AVX512=ON
if ! "$PEERS/bin/python" -c "import llama_cpp" 2>/dev/null; then
  "$PIP" install numpy diskcache jinja2 typing_extensions scikit-build-core cmake ninja
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=$AVX512 -DGGML_AVX512_VBMI=$AVX512 \
-DGGML_AVX512_VNNI=$AVX512 -DGGML_AVX512_BF16=$AVX512 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=2 "$PIP" install --no-deps --no-build-isolation --no-cache-dir \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

# llama.cpp's OpenAI server (python -m llama_cpp.server), for scripts/load_test.py --llama-cpp
"$PEERS/bin/python" -c "import llama_cpp.server.app" 2>/dev/null || \
  "$PIP" install fastapi uvicorn sse-starlette starlette-context pydantic-settings

# mistral.rs: the plain `mistralrs` wheel is the CPU build (the -cuda/-mkl/-metal ones are not)
"$PEERS/bin/python" -c "import mistralrs" 2>/dev/null || "$PIP" install "mistralrs==$MISTRALRS_VERSION"

"$PEERS/bin/python" -c "import llama_cpp; from importlib.metadata import version; \
print('llama-cpp-python', llama_cpp.__version__, '| mistralrs', version('mistralrs'))"
