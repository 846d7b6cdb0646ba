#!/usr/bin/env bash
# Everything a session lent a GPU needs, in ONE device call (under 9 minutes on an H100 / H200,
# the install included):
#
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
#
# then copy $OUT/<gpu>-<yyyymmdd>.json into bench/results/, run
#   python -m peftops paths bench/results/<that file>     (the PATHS rows and knobs to write)
#   python -m peftops report bench/results/<that file> --readme README.md --png bench/results/<name>.png
# here, and commit them together (the README's numbers come from there, never typed by hand).
#
# The same script on a CPU, in CI, before any GPU sees it:
#
#   OUT=<dir> bash bench/gpu_session.sh --rehearse
#
# runs the same stages through the same code with device cpu (Triton's interpreter,
# PEFTOPS_BACKEND=triton), the bench's small shapes timed by time.perf_counter, a few test files,
# the tiny Llama for e2e, kernel facts from compile-check's JSON (build/compile_check.json) or the
# tests' launch record, and its own budgets; `python -m peftops.benchmarks.check_session <dir>`
# then checks what it left (.ci/run does both).
#
# $OUT gets at most 8 files (the device tool returns no more, each < 16 MiB, none in folders):
#   <gpu>-<yyyymmdd>.json   the results (cpu-rehearsal-<date>.json in a rehearsal); floor.* records
#                           hold the device's measured HBM copy rate and GEMM rates
#   summary.json            mode, each stage's status / exit code / seconds / budget, test counts
#                           and failed ids, records timed / skipped / failed, kernel-facts summary,
#                           the check's verdict, the files written and anything trimmed
#   report.md               `python -m peftops report` on the results
#   session.tar.gz          every log (tests, bench, e2e, facts, check), tests.xml (junit),
#                           kernel_facts.json, stages.tsv, gpu.txt
# Logs are written to a scratch directory ($WORK), never into $OUT. After every stage (and in the
# EXIT trap) the archive and summary.json are rewritten, so a call cut anywhere still returns the
# files of the stages it finished; an archive over the size limit has its largest logs cut to
# their head and tail (named in summary.json "trimmed").
#
# Stages, in order, each under `timeout`. The whole run is capped at TOTAL_S (default 450 s; 540
# in a rehearsal); a stage gets the time left before that cap minus the default budgets of the
# stages still to come (time a stage leaves unused goes to the next one; one slow stage cannot
# eat the call); BUDGET_<STAGE>=s caps a stage further. Default budgets (seconds), real / rehearsal:
#   setup   ~20   GPU, driver, torch / triton / peftops versions; pip install -e . (no deps)
#   tests   105/100 the whole suite on CUDA, 8 workers / TEST_FILES in the interpreter -> tests.xml
#   bench   200/260 every METHODS entry but e2e (floors first, then fusion, then the rest), every
#                 provider; a method or provider whose dependency is missing: skipped records
#   e2e      85/60  the 1.1B Llama LoRA (then DoRA) training step / the tiny Llama   -> into the same JSON
#   facts    20/15  registers / spills / wgmma of every peftops kernel variant the session compiled
#                 (one fresh Triton cache) / from compile-check's JSON or the launch record
#   check    15/25  python -m peftops bench --check (exit status recorded, not fatal) + report.md
#
# Only some stages: `bash bench/gpu_session.sh bench e2e check` (names as above; setup always).
# A second call finishing a first one's bench: put the first call's JSON in the working tree (it
# travels with it) and run
#   RESUME_FROM=bench/results/<file>.json bash bench/gpu_session.sh bench e2e facts check
# -- the bench then times only the (case, provider) pairs that file lacks, into a copy of it.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
if [[ "${1:-}" == "--rehearse" ]]; then REHEARSE=1; shift; fi
OUT=${OUT:-/tmp/peftops-out}
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/peftops-session.XXXXXX")
LIMIT_BYTES=$((15 * 1024 * 1024))  # under the device tool's 16 MiB per file
export PYTHONUNBUFFERED=1
# One fresh Triton cache for every process of this session: `facts` walks it afterwards.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
# The tests' launch record goes to the scratch directory, not build/launches (compile-check's).
export PEFTOPS_LAUNCH_DIR=$WORK/launches
ORDER=(tests bench e2e facts check)
if (( REHEARSE )); then
  MODE=rehearse DEVICE=cpu
  export TRITON_INTERPRET=1 PEFTOPS_BACKEND=triton
  TOTAL_S=${TOTAL_S:-540}
  declare -A DEFAULT=([tests]=100 [bench]=260 [e2e]=60 [facts]=15 [check]=25)
  SMALL=(--small --smallest)
  TEST_DEVICE=cpu
  # A few files and tests (the bench tools, this session's machinery, kernels launched and
  # fallbacks), through the same pytest invocation as the real run.
  read -r -a TEST_SEL <<< "${TEST_FILES:-tests/test_bench_tools.py tests/test_gpu_session.py tests/test_bench_paths.py \
    tests/test_adapter.py::test_kernels_launched tests/test_adapter.py::test_fallbacks_are_visible \
    tests/test_lora.py::test_float64_falls_back_visibly}"
  TEST_WORKERS=(-p no:xdist)
else
  MODE=gpu DEVICE=cuda
  export PEFTOPS_BACKEND=auto
  TOTAL_S=${TOTAL_S:-450}
  declare -A DEFAULT=([tests]=105 [bench]=200 [e2e]=85 [facts]=20 [check]=15)
  SMALL=()
  TEST_DEVICE=cuda
  read -r -a TEST_SEL <<< "${TEST_FILES:-tests}"
  TEST_WORKERS=(-n 8)
fi
END=$((START + TOTAL_S))
STAGES=${*:-tests bench e2e facts check}
printf 'stage\tstatus\trc\tseconds\tbudget\tcpu_s\n' > "$WORK/stages.tsv"
RESULTS=""
echo "gpu_session ($MODE): stages [$STAGES], cap ${TOTAL_S}s; default budgets:" \
  "setup ~20s$(for s in "${ORDER[@]}"; do printf ', %s %ss' "$s" "${DEFAULT[$s]}"; done);" \
  "out $OUT, logs $WORK"

want() { [[ " $STAGES " == *" $1 "* ]]; }

# budget STAGE: the time left before the cap minus the default budgets of the wanted stages
# after STAGE, capped by BUDGET_<STAGE> if set.
budget() {
  local var="BUDGET_${1^^}" reserve=0 after=0 s b
  for s in "${ORDER[@]}"; do
    (( after )) && want "$s" && reserve=$((reserve + DEFAULT[$s]))
    [[ $s == "$1" ]] && after=1
  done
  b=$((END - $(date +%s) - reserve))
  [[ -n "${!var:-}" ]] && (( ${!var} < b )) && b=${!var}
  echo "$b"
}

# finish: the archive (every log, the junit XML, kernel facts, stages.tsv, gpu.txt; its largest
# logs cut to head + tail if it would pass the limit) and summary.json, both written to a temporary
# name and moved into $OUT; run after every stage and by the EXIT trap.
finish() {
  OUT="$OUT" WORK="$WORK" RESULTS="$RESULTS" START="$START" MODE="$MODE" TOTAL_S="$TOTAL_S" \
    LIMIT_BYTES="$LIMIT_BYTES" BUDGETS="$(for s in "${ORDER[@]}"; do printf '%s=%s ' "$s" "${DEFAULT[$s]}"; done)" \
    "$PY" -m peftops.benchmarks.session finish \
    || echo "summary.json / session.tar.gz: could not be written"
}

# cpu_now: CPU to the user + system CPU seconds of every process this shell has waited for so far
# (bash's `times`, run in this shell, not a subshell): a stage's difference is its CPU time, what
# it would take on an idle core (the wall time of a shared machine says little).
cpu_now() {
  times > "$WORK/times.txt"
  CPU=$(tail -n 1 "$WORK/times.txt" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); s += p[1] * 60 + p[2] } printf "%d", s }')
}

# stage NAME CMD...: run CMD under the stage's budget (SIGINT first, so pytest and the bench
# finish their files, SIGKILL 10 s later), output to $WORK/NAME.log, a row in stages.tsv.
stage() {
  local name=$1 b t0 c0 rc status CPU
  b=$(budget "$1")
  shift
  if (( b < 5 )); then
    printf '%s\tskipped (no time left)\t-\t0\t%s\t0\n' "$name" "$b" >> "$WORK/stages.tsv"
    echo "== $name: skipped, no time left"
    return 0
  fi
  echo "== $name (budget ${b}s, $(( $(date +%s) - START ))s into the session): $*"
  t0=$(date +%s)
  cpu_now
  c0=$CPU
  timeout -s INT -k 10 "$b" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  status=done
  (( rc == 124 || rc == 137 )) && status="timed out"
  cpu_now
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$b" \
    "$(( CPU - c0 ))" >> "$WORK/stages.tsv"
  echo "   -> $status, rc=$rc, $(( $(date +%s) - t0 ))s ($(( CPU - c0 )) CPU s); last lines of $name.log:"
  tail -n "${TAIL_LINES:-12}" "$WORK/$name.log" | cut -c1-220 | sed 's/^/   | /'
  finish > /dev/null
  return 0
}
# The scratch directory goes with the process (KEEP_WORK=1 keeps it: its path is printed above).
trap 'finish; [[ -n "${KEEP_WORK:-}" ]] || rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- setup (always)
{
  if (( REHEARSE )); then
    echo "rehearsal on $(nproc) CPU cores: TRITON_INTERPRET=1 PEFTOPS_BACKEND=triton"
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
  fi
  "$PY" -c "import sys, torch, triton, peftops; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '| peftops', peftops.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"
  git log -1 --format='commit %h %s' 2>/dev/null || true
} 2>&1 | tee "$WORK/gpu.txt"
# One interpreter for the results file's name and the method list (a Python start costs seconds here).
# Every method but e2e: the device floors first, then AdapterFusion (whose bars are against compile:
# first in the compile pass, which runs after every other provider), then the rest in registry
# order (new methods join with no edit here).
read -r RESULTS METHODS < <("$PY" -c "
import sys
from peftops.benchmarks import METHODS as M
from peftops.benchmarks.core import device_label, results_path
first = [m for m in ('floors', 'fusion') if m in M]
print(results_path(sys.argv[1], device_label(sys.argv[2])), ','.join(first + [m for m in M if m not in first and m != 'e2e']))
" "$OUT" "$DEVICE" 2>/dev/null)
[[ -n "${RESULTS:-}" ]] || RESULTS="$OUT/results.json"
[[ -n "${METHODS:-}" ]] || METHODS=floors,fusion,adapter,ia3,lora,prefix_attention,unipelt
RESUME=()
if [[ -n "${RESUME_FROM:-}" && -f "$RESUME_FROM" ]]; then
  cp "$RESUME_FROM" "$RESULTS" && chmod u+w "$RESULTS" && RESUME=(--resume)
fi
echo "results file: $RESULTS ${RESUME[*]:+(resuming $RESUME_FROM)}; methods: $METHODS; triton cache: $TRITON_CACHE_DIR"
cpu_now
printf 'setup\tdone\t0\t%s\t-\t%s\n' "$(( $(date +%s) - START ))" "$CPU" >> "$WORK/stages.tsv"
finish > /dev/null

# ---------------------------------------------------------------- stages
# The bench's own --budget-s stops it starting providers ~25 s before its stage budget ends.
inner() { local b; b=$(budget "$1"); echo $(( b > 50 ? b - 25 : b / 2 )); }
want tests && stage tests env PEFTOPS_TEST_DEVICE="$TEST_DEVICE" \
  "$PY" -m pytest "${TEST_SEL[@]}" "${TEST_WORKERS[@]}" -q -p no:cacheprovider --durations=15 \
  --junitxml="$WORK/tests.xml"

want bench && stage bench "$PY" -m peftops bench --device "$DEVICE" ${SMALL[@]+"${SMALL[@]}"} --methods "$METHODS" \
  --out "$RESULTS" --budget-s "$(inner bench)" ${RESUME[@]+"${RESUME[@]}"}

want e2e && stage e2e "$PY" -m peftops bench --device "$DEVICE" ${SMALL[@]+"${SMALL[@]}"} --methods e2e \
  --out "$RESULTS" --budget-s "$(inner e2e)" ${RESUME[@]+"${RESUME[@]}"}

if (( REHEARSE )); then
  want facts && stage facts "$PY" -m peftops.benchmarks.kernel_facts --compile-check build/compile_check.json \
    --launches "$PEFTOPS_LAUNCH_DIR" --out "$WORK/kernel_facts.json"
else
  want facts && stage facts "$PY" -m peftops.benchmarks.kernel_facts --cache-dir "$TRITON_CACHE_DIR" \
    --out "$WORK/kernel_facts.json"
fi

if want check; then
  TAIL_LINES=4 stage check "$PY" -m peftops bench --check "$RESULTS"
  if [[ -f "$RESULTS" ]]; then
    timeout 20 "$PY" -m peftops report "$RESULTS" > "$OUT/report.md" 2> "$WORK/report.log" || true
  fi
fi
# summary.json and session.tar.gz: written by the EXIT trap (finish)
