#!/usr/bin/env bash
# What a session lent a GPU runs, in as few device calls as possible (device time is 30 min):
#   run(command="bash bench/gpu_session.sh tests", timeout_s=600)   # the parity suite on the GPU
#   run(command="bash bench/gpu_session.sh bench", timeout_s=600)   # the whole bench -> $OUT/*.json
# then copy $OUT's JSON into bench/results/ and commit it; the README's numbers come from there.
# Debug on CPU first (TRITON_INTERPRET=1 tests, `python -m peftops compile-check`).
set -uo pipefail
OUT=${OUT:-/tmp/peftops-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tee "$OUT/install.log"
python3 -c "import torch, triton, peftops; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

case "${1:-tests}" in
  tests)  # parity on the GPU: the same suite CI runs in the interpreter (fp32 at IEEE bounds, tf32 tests set their own)
    python3 -m pytest tests -q -n 8 -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/tests.log"
    ;;
  bench)
    python3 -m peftops bench --out "$OUT" 2>&1 | tee "$OUT/bench.log"
    ;;
  *) echo "usage: $0 tests|bench" >&2; exit 2 ;;
esac
