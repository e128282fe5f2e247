#!/usr/bin/env bash
# The one GPU check (../shared/GPU.md): versions, offline build for sm_90a with the ptxas report, the GPU tests,
# the kernel benchmarks, and end-to-end latency / throughput at the real 25.8B shapes (dummy weights), each
# beside its baseline. Everything lands under $OUT (default ./gpu_out) and a short table is printed last.
#
#   OUT=/tmp/out scripts/gpu_check.sh
#   GPU_CHECK_STEPS="latency throughput" scripts/gpu_check.sh     # a subset (a re-run on a warm machine)
#
# Under $OUT at the end (a device call brings back at most 8 files): summary.json (every step's JSON merged,
# with each step's status, time and last log lines), build.log (with the ptxas report), gpu_tests.log, the
# kernel benchmarks' PNG plots, and details.tar.gz (each step's JSON and full log). While it runs, each step
# writes its JSON to $OUT directly, so a call cut short still brings back what was measured.
# Every step runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET seconds (default 420: the whole
# call, with the machine's start and the copy back, stays under 8 minutes on an H100). The end-to-end runs
# pass --kernels cuda, so a broken build can never fall back to the PyTorch twins unnoticed; and when the
# build or the GPU tests fail, no benchmark runs at all (each is recorded as "blocked"): their numbers would
# mean nothing. The reference-path comparisons are sized to fit (short outputs; none at the largest batch).
# A failing step is recorded and the rest go on; the exit status is non-zero if any failed or was blocked.
set -u

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
STEPS=${GPU_CHECK_STEPS:-"versions build tests latency throughput moe attention max_batch"}
WORK=$(mktemp -d)
START=$(date +%s)
export PY OUT PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} XVERSE_PTXAS_VERBOSE=1
# The end-to-end model; GPU_CHECK_MODEL replaces it (e.g. "--model /tmp/ckpt --device cpu" for a dry run).
read -r -a MODEL <<<"${GPU_CHECK_MODEL:-"--model xverse-moe-a4.2b --load-format dummy"}"
KERNELS=(--kernels "${GPU_CHECK_KERNELS:-cuda}")   # never "auto": a missing CUDA build must fail, not fall back
BLOCKED=""   # why the benchmarks cannot run (a failed build or failed GPU tests); empty while all is well
echo "== gpu_check: budget ${BUDGET}s, steps: $STEPS"

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME TIMEOUT_S CMD...: runs CMD (a command, or a function of this script) with its output to the
# console and $WORK/NAME.log; records NAME, status, exit code and seconds in $WORK/steps.tsv.
# bench_step NAME TIMEOUT_S CMD...: the same for a benchmark, which does not run once BLOCKED is set.
step() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "== $name: SKIPPED (${left}s of the ${BUDGET}s budget left)"
    printf '%s\tskipped\t-1\t0\n' "$name" >>"$WORK/steps.tsv"
    return 0
  fi
  echo "== $name (timeout ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # `timeout` runs programs, so a function runs in its own bash
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $1" 2>&1 | tee "$WORK/$name.log"
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  fi
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "== $name: $status (rc $rc, $(( $(date +%s) - t0 ))s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >>"$WORK/steps.tsv"
  return "$rc"
}

bench_step() {
  wanted "$1" || return 0
  if [[ -n "$BLOCKED" ]]; then
    echo "== $1: blocked ($BLOCKED)"
    printf '%s\tblocked\t-1\t0\n' "$1" >>"$WORK/steps.tsv"
    return 0
  fi
  step "$@"
}

# An optional script (written separately): run it if present, else record that it is absent.
optional_module() {
  local name=$1 module=$2 limit=$3
  shift 3
  wanted "$name" || return 0
  if [[ -f "${module//.//}.py" ]]; then
    bench_step "$name" "$limit" "$PY" -m "$module" "$@"
  else
    echo "== $name: ABSENT (${module//.//}.py is not in this checkout; nothing to run)"
    printf '%s\tabsent\t-1\t0\n' "$name" >>"$WORK/steps.tsv"
  fi
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || nvidia-smi || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda",
      torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  local nvcc
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  "$nvcc" --version | tail -n 2 || echo "nvcc not found"
}

build() {
  # Offline: no build isolation, no dependencies; fall back to an in-place build if pip cannot.
  # -v: pip shows the compiler output (the ptxas report) only when verbose
  { "$PY" -m pip install -v --no-build-isolation --no-deps -e . ||
      { echo "pip install failed; trying setup.py build_ext --inplace"; "$PY" setup.py build_ext --inplace; }
  } >"$OUT/build.log" 2>&1
  local rc=$?
  # the resource report: registers / shared memory per kernel, non-zero spills, and any error
  grep -E "error:|ptxas info *: (Compiling entry|Used)|[1-9][0-9]* bytes spill" "$OUT/build.log" | tail -n 40
  (( rc == 0 )) || { echo "build failed (rc $rc): tail of build.log"; tail -n 30 "$OUT/build.log"; return "$rc"; }
  "$PY" -c 'import xverse_engine._C as ext; print("extension built, CUDA kernels:", ext.built_with_cuda);
import sys; sys.exit(0 if ext.built_with_cuda else 1)'
}

gpu_tests() {
  "$PY" -m pytest -q -m gpu -rfEs tests >"$OUT/gpu_tests.log" 2>&1
  local rc=$?
  tail -n 60 "$OUT/gpu_tests.log"
  (( rc == 5 )) && { echo "no test is marked gpu"; return 0; }  # pytest: nothing collected
  return "$rc"
}

# In order of what a short lease must not miss: the build and tests, the end-to-end goals, the kernels.
# Limits (s): a cold 16-core build of csrc/ takes ~2-3 minutes; each end-to-end run loads 51.6 GB of dummy
# weights (~20 s), captures its CUDA graphs, and runs its reference comparison on short outputs.
step versions 20 versions
step build 210 build || BLOCKED="the build failed"
if wanted build && [[ -z "$BLOCKED" ]] && ! grep -q $'^build\tok' "$WORK/steps.tsv"; then
  BLOCKED="the build did not finish"
fi
if [[ -z "$BLOCKED" ]]; then
  step tests 120 gpu_tests || BLOCKED="the GPU tests failed"
fi
bench_step latency 75 "$PY" -m benchmarks.latency "${MODEL[@]}" "${KERNELS[@]}" --batch-size 1 --input-len 128 \
  --output-len 64 --warmup-iters 1 --iters 3 --max-num-seqs 8 --compare-reference --json "$OUT/latency.json"
bench_step throughput 100 "$PY" -m benchmarks.throughput "${MODEL[@]}" "${KERNELS[@]}" --num-prompts 32 \
  --input-len 1024 --output-len 64 --max-num-seqs 64 --compare-reference --reference-batch-size 32 \
  --json "$OUT/throughput.json"
optional_module moe benchmarks.kernels.bench_moe 60 --json "$OUT/bench_moe.json"
optional_module attention benchmarks.kernels.bench_attention 45 --json "$OUT/bench_attention.json"
# The largest batch: the engine alone (the reference path at this size would not fit the budget).
bench_step max_batch 90 "$PY" -m benchmarks.throughput "${MODEL[@]}" "${KERNELS[@]}" --max-batch --input-len 512 \
  --output-len 256 --json "$OUT/throughput_max_batch.json"
# Host time per step (model stubbed), and how much of it hides under 25 ms of device work per step (issue 11).
bench_step host_overhead 60 "$PY" -m benchmarks.host_overhead --device cuda "${KERNELS[@]}" --batch-sizes 64 256 \
  --sampling defaults topk_topp_logprobs --repeats 2 --steps 20 --simulate-gpu-ms 25 --json "$OUT/host_overhead.json"

# Merge every JSON and the step records into summary.json; print the table last.
OUT="$OUT" WORK="$WORK" TOTAL=$(( $(date +%s) - START )) timeout 30 "$PY" - <<'PY'
import glob, json, os
out, work = os.environ["OUT"], os.environ["WORK"]
steps = []
for line in open(os.path.join(work, "steps.tsv")) if os.path.exists(os.path.join(work, "steps.tsv")) else []:
    name, status, rc, seconds = line.rstrip("\n").split("\t")
    log = os.path.join(work, name + ".log")
    tail = open(log, errors="replace").read().splitlines()[-25:] if os.path.exists(log) else []
    steps.append({"step": name, "status": status, "rc": int(rc), "seconds": int(seconds), "log_tail": tail})
results = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    if os.path.basename(path) == "summary.json":
        continue
    try:
        results[os.path.basename(path)[:-5]] = json.load(open(path))
    except ValueError as error:
        results[os.path.basename(path)[:-5]] = {"error": f"unreadable JSON: {error}"}
summary = {"total_seconds": int(os.environ["TOTAL"]), "steps": steps, "results": results}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)


def headline(name, r):
    if r.get("benchmark") == "host_overhead":
        return "; ".join(f"B={x['batch']} {x['sampling']}: host {x['cpu_ms']:.2f} ms"
                         + (f", {100 * x['host_hidden_fraction']:.0f}% hidden" if "host_hidden_fraction" in x else "")
                         for x in r["results"])
    if "results" not in r or not isinstance(r["results"], dict):
        return ", ".join(k for k in r if k not in ("machine",))[:90]
    res, roof = r["results"], r.get("roofline", {})
    ref = r.get("speedup_vs_reference")
    if r.get("benchmark") == "latency":
        text = (f"TTFT p50 {1e3 * res['ttft_s']['p50']:.1f} ms, TPOT p50 {1e3 * res['tpot_s']['p50']:.2f} ms = "
                f"{res['decode_tokens_per_s']:.0f} tok/s ({100 * res['fraction_of_decode_ceiling']:.0f}% of "
                f"{roof.get('ceiling_tokens_per_s', 0):.0f})")
        if isinstance(ref, dict):
            text += f", {ref['tpot']:.1f}x ref TPOT"
        return text
    text = (f"{res['num_requests']} req: {res['output_tokens_per_s']:.0f} out tok/s "
            f"({100 * res['fraction_of_decode_ceiling']:.0f}% of {roof.get('ceiling_tokens_per_s', 0):.0f})")
    if ref is not None:
        text += f", {ref:.1f}x ref"
    return text


print(f"\n== gpu_check summary ({summary['total_seconds']}s) -> {os.path.join(out, 'summary.json')}")
print(f"{'step':<11} {'status':<8} {'s':>4}  result")
for s in steps:
    r = results.get({"moe": "bench_moe", "attention": "bench_attention", "max_batch": "throughput_max_batch"}
                    .get(s["step"], s["step"]))
    try:
        text = headline(s["step"], r) if r else ""
    except (KeyError, TypeError, ZeroDivisionError) as error:
        text = f"(no headline: {error!r})"
    print(f"{s['step']:<11} {s['status']:<8} {s['seconds']:>4}  {text}")
PY

# Fold the per-step JSONs and full logs into one archive: the file count stays within what comes back.
mkdir -p "$WORK/details"
for f in "$OUT"/*.json; do
  [[ -f "$f" && $(basename "$f") != summary.json ]] && mv "$f" "$WORK/details/"
done
cp "$WORK"/*.log "$WORK/details/" 2>/dev/null
timeout 30 tar -czf "$OUT/details.tar.gz" -C "$WORK/details" .

failed=$(awk -F'\t' '$2 == "failed" || $2 == "timeout" || $2 == "skipped" || $2 == "blocked" {print $1}' "$WORK/steps.tsv" 2>/dev/null | xargs)
rm -rf "$WORK"
if [[ -n "$failed" ]]; then
  echo "FAILED steps: $failed"
  exit 1
fi
echo "all steps passed"
