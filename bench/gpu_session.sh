#!/usr/bin/env bash
# Everything a session lent a GPU needs, in ONE device call (under 8 minutes on an H100):
#
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
#
# then copy $OUT/<gpu>-<yyyymmdd>.json into bench/results/, run
# `python -m peftops report bench/results/<that file> --readme README.md --png bench/results/<name>.png`
# here, and commit both (the README's numbers come from there, never typed by hand).
#
# Stages, in order, each under `timeout`. The whole run is capped at TOTAL_S (default 450 s);
# a stage gets the time left before that cap minus the default budgets of the stages still to
# come (so time a stage leaves unused goes to the next one, and one slow stage cannot eat the
# call); BUDGET_<STAGE>=s caps a stage further. Default budgets (seconds):
#   setup   ~20  GPU, driver, torch / triton / peftops versions; pip install -e . (no deps)
#   tests   105  the whole suite on CUDA, 8 workers       -> tests.log, tests.xml (junit)
#   bench   200  every case x every provider but e2e      -> <gpu>-<date>.json (+ bench.log)
#   e2e      85  the 1.1B Llama LoRA (then DoRA) training step -> merged into the same JSON
#   facts    20  n_regs / n_spills / REG / STACK / wgmma of every peftops kernel variant the
#                tests and the bench compiled (one fresh Triton cache for the whole session)
#                                                          -> kernel_facts.json
#   check    15  python -m peftops bench --check on the JSON (exit status recorded, not fatal);
#                the README markdown of `report`           -> check.log, report.md
# and always, even when cut short: summary.json (stage status / seconds / exit codes, test
# counts and failed ids, records measured and provider errors, kernel facts summary, check
# result) and stages.tsv. The bench writes its JSON after every provider and times the
# compiling providers last (and stops starting new ones near its budget, --budget-s), so a
# stage cut short keeps what it measured; --check lists the rest as not measured.
#
# Only some stages: `bash bench/gpu_session.sh bench e2e check` (names as above; setup always).
# A second call finishing a first one's bench (compile providers are the ones a full call may
# not reach): put the first call's JSON in the working tree (it travels with it) and run
#   RESUME_FROM=bench/results/<file>.json bash bench/gpu_session.sh bench e2e facts check
# -- the bench then times only the (case, provider) pairs that file lacks, into a copy of it.
# Debug on CPU first: TRITON_INTERPRET=1 tests, `python -m peftops compile-check`, `bash -n`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/peftops-out}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-450}
START=$(date +%s)
END=$((START + TOTAL_S))
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PEFTOPS_BACKEND=auto
# One fresh Triton cache for every process of this session: `facts` walks it afterwards.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d /tmp/peftops-triton-cache.XXXXXX)}
STAGES=${*:-tests bench e2e facts check}
printf 'stage\tstatus\trc\tseconds\tbudget\n' > "$OUT/stages.tsv"
RESULTS=""

want() { [[ " $STAGES " == *" $1 "* ]]; }
ORDER=(tests bench e2e facts check)
declare -A DEFAULT=([tests]=105 [bench]=200 [e2e]=85 [facts]=20 [check]=15)

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

# stage NAME CMD...: run CMD under the stage's budget (SIGINT first, so pytest and the bench
# finish their files, SIGKILL 10 s later), output to $OUT/NAME.log, a row in stages.tsv.
stage() {
  local name=$1 b t0 rc status
  b=$(budget "$1")
  shift
  if (( b < 5 )); then
    printf '%s\tskipped (no time left)\t-\t0\t%s\n' "$name" "$b" >> "$OUT/stages.tsv"
    echo "== $name: skipped, no time left"
    return 0
  fi
  echo "== $name (budget ${b}s, $(( $(date +%s) - START ))s into the session): $*"
  t0=$(date +%s)
  timeout -s INT -k 10 "$b" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  status=done
  (( rc == 124 || rc == 137 )) && status="timed out"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$b" >> "$OUT/stages.tsv"
  echo "   -> $status, rc=$rc, $(( $(date +%s) - t0 ))s; last lines of $name.log:"
  tail -n "${TAIL_LINES:-12}" "$OUT/$name.log" | cut -c1-220 | sed 's/^/   | /'
  return 0
}

write_summary() {
  OUT="$OUT" RESULTS="$RESULTS" START="$START" TRITON_CACHE_DIR="$TRITON_CACHE_DIR" "$PY" - <<'PYEOF' || echo "summary.json: could not be written"
import csv, glob, json, os, time
out = os.environ["OUT"]
s = {"seconds": int(time.time()) - int(os.environ["START"]), "out": out, "stages": []}
try:
    with open(os.path.join(out, "stages.tsv")) as f:
        s["stages"] = list(csv.DictReader(f, delimiter="\t"))
except OSError:
    pass
try:
    s["gpu"] = open(os.path.join(out, "gpu.txt")).read().strip().splitlines()
except OSError:
    pass
try:
    import xml.etree.ElementTree as ET
    root = ET.parse(os.path.join(out, "tests.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    t = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
    t["passed"] = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
    t["failed_ids"] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None][:300]
    s["tests"] = t
except Exception as exc:
    s["tests"] = {"error": f"{type(exc).__name__}: {exc}"}
results = os.environ.get("RESULTS")
if results and os.path.exists(results):
    recs = json.load(open(results))
    s["results"] = {"file": os.path.basename(results), "records": len(recs),
                    "timed": sum(1 for r in recs if r.get("median_ms")),
                    "errors": [f"{r['op']} {r['shape']} {r['provider']}: {r['error'][:200]}"
                               for r in recs if r.get("error")]}
try:
    s["kernel_facts"] = json.load(open(os.path.join(out, "kernel_facts.json")))["summary"]
except Exception:
    pass
try:
    lines = open(os.path.join(out, "check.log")).read().splitlines()
    s["check"] = [l for l in lines if l.startswith(("RULE:", "BARS:", "exit "))]
except OSError:
    pass
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(s, f, indent=1)
print("summary.json:", json.dumps({k: s[k] for k in ("seconds", "tests", "results", "kernel_facts", "check")
                                   if k in s}, default=str)[:3000])
PYEOF
}
trap write_summary EXIT

# ---------------------------------------------------------------- setup (always)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
  "$PY" -c "import sys, torch, triton, peftops; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '| peftops', peftops.__version__, '|', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  git log -1 --format='commit %h %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/gpu.txt"
RESULTS=$("$PY" -c "import sys, torch; from peftops.benchmarks.core import results_path; print(results_path(sys.argv[1], torch.cuda.get_device_name()))" "$OUT" 2>/dev/null)
[[ -n "$RESULTS" ]] || RESULTS="$OUT/results.json"
RESUME=()
if [[ -n "${RESUME_FROM:-}" && -f "$RESUME_FROM" ]]; then
  cp "$RESUME_FROM" "$RESULTS" && chmod u+w "$RESULTS" && RESUME=(--resume)
fi
echo "results file: $RESULTS ${RESUME[*]:+(resuming $RESUME_FROM)}; triton cache: $TRITON_CACHE_DIR"
printf 'setup\tdone\t0\t%s\t-\n' "$(( $(date +%s) - START ))" >> "$OUT/stages.tsv"

# ---------------------------------------------------------------- stages
# The bench's own --budget-s stops it starting providers ~25 s before its stage budget ends.
inner() { local b; b=$(budget "$1"); echo $(( b > 50 ? b - 25 : b / 2 )); }
want tests && stage tests env PEFTOPS_TEST_DEVICE=cuda \
  "$PY" -m pytest tests -n 8 -q -p no:cacheprovider --durations=15 --junitxml="$OUT/tests.xml"

# Method order = the order of the compile pass (run after every other provider): AdapterFusion
# first, whose bars are against compile.
want bench && stage bench "$PY" -m peftops bench --methods fusion,lora,dora,ia3,adapter,prefix_attention,unipelt \
  --out "$RESULTS" --budget-s "$(inner bench)" ${RESUME[@]+"${RESUME[@]}"}

want e2e && stage e2e "$PY" -m peftops bench --methods e2e --out "$RESULTS" --budget-s "$(inner e2e)" ${RESUME[@]+"${RESUME[@]}"}

want facts && stage facts "$PY" -m peftops.benchmarks.kernel_facts --cache-dir "$TRITON_CACHE_DIR" \
  --out "$OUT/kernel_facts.json"

if want check; then
  TAIL_LINES=4 stage check "$PY" -m peftops bench --check "$RESULTS"
  timeout 10 "$PY" -m peftops report "$RESULTS" > "$OUT/report.md" 2>&1 || true
fi
# summary.json is written by the EXIT trap
