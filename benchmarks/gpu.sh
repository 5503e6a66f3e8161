#!/usr/bin/env bash
# One prepared run of every GPU benchmark case (issue 7), sized to finish in under 8 minutes on one H100:
# each case in its own worker process (JAX and PyTorch eager + torch.compile side by side), cases in priority
# order (the issue's H100 targets first), and a deadline after which remaining cases are recorded as skipped.
# Writes bench_gpu.json and bench_gpu.md into $OUT (the device tool's folder) or $BENCH_OUT_DIR or the cwd.
#
# On a lent device machine (`run` tool), from the repository root:
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu.sh
# Its python3 has JAX (CUDA), PyTorch and transformers but not ml_collections: carry it as a wheel,
#   here: echo /.whl/ >> .git/info/exclude
#         python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
#   and name `.whl` in the run's `carry`; this script installs whatever wheels .whl holds.
# Extra arguments go to `python -m internvl_jax.bench` and win over the defaults below (e.g. --cases NAME,
# --batch N, --dry-run, which runs every case with tiny shapes: the CPU test uses that to check this script).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-${BENCH_OUT_DIR:-.}}"
mkdir -p "$OUT_DIR"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bench_site .whl/*.whl
  export PYTHONPATH="/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX allocates on demand so PyTorch in the same process gets memory too (also set by the module itself).
export XLA_PYTHON_CLIENT_PREALLOCATE=false

# 450 s of cases + start-up stays under the 8 minutes the device tool's budget allows for this script.
exec "$PY" -m internvl_jax.bench --cases gpu --isolate --torch-compile both \
  --deadline-s "${BENCH_DEADLINE_S:-450}" \
  --out "$OUT_DIR/bench_gpu.json" --markdown "$OUT_DIR/bench_gpu.md" "$@"
