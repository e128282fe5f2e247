#!/usr/bin/env bash
# Mutation testing of chosen modules with mutmut (configured in setup.cfg), within a time budget.
#
#   scripts/mutation_test.sh [--budget SECONDS] [--jobs N] [--again] MODULE...
#   scripts/mutation_test.sh sampler detokenizer block_manager scheduler config
#
# --again: after adding tests, keep the last run's scratch copy and results, copy the current tests/ in, and
# re-run only the mutants that survived (the source file must be unchanged since that run).
# MODULE is one of the names below (each maps to a source file and the tests that should kill its mutants).
# Runs in a scratch copy of the working tree (mutmut writes a mutants/ tree there), 2 workers by default,
# and prints per module: mutants, killed, survived, timeouts, not checked (the budget ran out), and the
# surviving mutant names (`mutmut show NAME` in the scratch copy shows the diff). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

budget=1200
jobs=2
again=0
modules=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) budget=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --again) again=1; shift ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) modules+=("$1"); shift ;;
    esac
done
[ ${#modules[@]} -gt 0 ] || { echo "give at least one module (see --help)" >&2; exit 2; }
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install mutmut" >&2; exit 2; }
ls xverse_engine/_C*.so >/dev/null 2>&1 || { echo "build the extension first (see README)" >&2; exit 2; }

source_of() {
    case "$1" in
        sampler) echo xverse_engine/layers/sampler.py ;;
        detokenizer) echo xverse_engine/engine/detokenizer.py ;;
        block_manager) echo xverse_engine/engine/block_manager.py ;;
        scheduler) echo xverse_engine/engine/scheduler.py ;;
        config) echo xverse_engine/config.py ;;
        loader) echo xverse_engine/loader.py ;;
        rotary) echo xverse_engine/layers/rotary.py ;;
        norm) echo xverse_engine/layers/norm.py ;;
        ops_moe) echo xverse_engine/ops/moe.py ;;
        ops_attention) echo xverse_engine/ops/attention.py ;;
        *) echo "unknown module $1" >&2; exit 2 ;;
    esac
}
tests_of() {
    case "$1" in
        sampler) echo tests/test_spec_sampling_rules.py tests/test_spec_sampler.py ;;
        detokenizer) echo tests/test_spec_detokenizer.py tests/test_spec_stop.py ;;
        block_manager) echo tests/test_spec_block_manager.py tests/test_spec_prefix_cache.py ;;
        scheduler) echo tests/test_spec_scheduler.py tests/test_spec_prefix_cache.py ;;
        config) echo tests/test_spec_config.py tests/test_config_loader.py ;;
        loader) echo tests/test_config_loader.py tests/test_model_vs_reference.py ;;
        rotary) echo tests/test_spec_rope.py tests/test_model_vs_reference.py ;;
        norm) echo tests/test_spec_bf16.py tests/test_model_vs_reference.py ;;
        ops_moe) echo tests/test_moe_ops.py tests/test_spec_bf16.py ;;
        ops_attention) echo tests/test_attention_ops.py ;;
    esac
}

deadline=$(( $(date +%s) + budget ))
for module in "${modules[@]}"; do
    source=$(source_of "$module")
    tests=$(tests_of "$module")
    left=$(( deadline - $(date +%s) ))
    if [ $left -le 30 ]; then echo "== $module: no time left in the budget"; continue; fi
    scratch=${MUTATION_SCRATCH:-/tmp/xverse-mutation}/$module
    names=()
    if [ $again = 1 ]; then
        cmp -s "$source" "$scratch/$source" || { echo "== $module: $source changed since the last run: run without --again"; continue; }
        rm -rf "$scratch/tests" && cp -r tests "$scratch/tests"
        mapfile -t names < <(cd "$scratch" && mutmut results --all true 2>/dev/null | sed -n 's/^ *\([^ ]*\): \(survived\|no tests\)$/\1/p')
        [ ${#names[@]} -gt 0 ] || { echo "== $module: no survivors to re-run"; }
    else
        rm -rf "$scratch" && mkdir -p "$scratch"
        # the working tree as git sees it (tracked + untracked, not ignored), plus the built extension
        git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$scratch" 2>/dev/null || true
        cp xverse_engine/_C*.so "$scratch/xverse_engine/"
    fi
    python - "$scratch/setup.cfg" "$source" $tests <<'PY'
import configparser, sys
path, source, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = configparser.ConfigParser()
cfg.read(path)
cfg["mutmut"]["only_mutate"] = "\n" + source
cfg["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
with open(path, "w") as f:
    cfg.write(f)
PY
    echo "== $module: mutating $source, tests: $tests ($left s left)${names:+; again: ${#names[@]} survivors}"
    if [ $again = 0 ] || [ ${#names[@]} -gt 0 ]; then
        ( cd "$scratch" && OMP_NUM_THREADS=1 timeout "$left" nice -n 10 mutmut run --max-children "$jobs" "${names[@]}" \
            >>mutmut.log 2>&1 ) || echo "   (mutmut stopped: exit $?; see $scratch/mutmut.log)"
    fi
    ( cd "$scratch" && mutmut results --all true >results.txt 2>&1 || true )
    python - "$scratch/results.txt" "$module" <<'PY' | tee "$scratch/summary.txt"
import collections, sys
pairs = [line.strip().rsplit(": ", 1) for line in open(sys.argv[1]) if ": " in line]
status = collections.Counter(state for _, state in pairs)
checked = sum(n for state, n in status.items() if state != "not checked")
survived = status["survived"] + status["no tests"]   # no test even runs the mutated code: it survives too
print(f"   {sys.argv[2]}: {len(pairs)} mutants, {checked} checked: {status['killed']} killed, {survived} survived "
      f"({100.0 * survived / max(checked, 1):.1f}%), {status['timeout']} timeouts; {status['not checked']} not "
      f"checked (budget); all states {dict(status)}")
for name, state in pairs:
    if state in ("survived", "no tests"):
        print(f"   {state}:", name)
PY
done
