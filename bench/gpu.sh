#!/usr/bin/env bash
# bash bench/gpu.sh   (from the repo root on a CUDA machine; no .venv needed: torch and transformers must
# be importable by python3, e.g. through PYTHONPATH). Prints JSON; writes $OUT/gpu_bench.json when OUT is set.
# Extra arguments go to bench/gpu.py (--no-compile, --dry-run). BENCH_GPU_BUDGET_S (default 250) caps the
# benchmarks' own time so the whole run stays under 5 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

echo "[gpu bench] repo: $PWD, python: $PY" >&2
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
else
  echo "[gpu bench] nvidia-smi not found (continuing; torch decides)" >&2
fi
if ! "$PY" -c "import torch, transformers, llmlab" 2>/dev/null; then
  echo "[gpu bench] cannot import torch, transformers and llmlab with $PY; put them on PYTHONPATH" >&2
  "$PY" -c "import torch, transformers, llmlab" || true
  exit 1
fi
"$PY" -c "import torch, transformers; print('[gpu bench] torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| transformers', transformers.__version__)" >&2

status=0
timeout 295 "$PY" bench/gpu.py "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "[gpu bench] bench/gpu.py exited with status $status (124 = hit the 295 s limit)" >&2
fi
exit "$status"
