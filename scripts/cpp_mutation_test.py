"""Hand-written mutants of the C++ CPU kernels, and which tests kill each one.

    python scripts/cpp_mutation_test.py [--only G1 P2 ...] [--out docs/cpp_mutants.md]

Each mutant is one small index or constant change in a csrc/**/*_cpu.cpp file. In a scratch copy of the
working tree (the repo is never touched) every mutant is applied alone, the extension is rebuilt
(`MAX_JOBS=1 XVERSE_NO_CUDA=1 XVERSE_NO_EMU=1 python setup.py build_ext --inplace`: only the CPU extension,
and ninja's build directory in the scratch copy is kept, so only the changed file recompiles),
the tests that exercise that kernel on the CPU run, and the failing tests are recorded. A mutant no test
kills is either a gap (write the test) or equivalent (say why in EQUIVALENT). Not run in CI: each rebuild
takes minutes on a 2-core machine.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MOE_TESTS = ["tests/test_moe_ops.py", "tests/test_model_vs_reference.py", "tests/test_spec_bf16.py", "-k", "cpu"]
ATTENTION_TESTS = ["tests/test_attention_ops.py", "tests/test_model_vs_reference.py", "-k", "cpu"]
FUSED_TESTS = ["tests/test_fused_ops.py", "tests/test_model_vs_reference.py", "-k", "cpu"]

# id: (file, original text, mutated text, what the change means)
MUTANTS = {
    "G1": ("csrc/moe/gating_topk_cpu.cpp", "(a == b && ia < ib)", "(a == b && ia > ib)",
           "top-k ties go to the higher expert index"),
    "G2": ("csrc/moe/gating_topk_cpu.cpp", "? -std::numeric_limits<float>::infinity() : probs[e]",
           "? std::numeric_limits<float>::infinity() : probs[e]", "NaN ranks above every number"),
    "G3": ("csrc/moe/gating_topk_cpu.cpp", "constexpr float kRouterEps = 1e-6f;", "constexpr float kRouterEps = 1e-3f;",
           "renormalisation epsilon 1e-6 -> 1e-3"),
    "A1": ("csrc/moe/align_permute_cpu.cpp", "(counts[e] + block_m - 1) / block_m * block_m",
           "(counts[e] + block_m - 2) / block_m * block_m", "group padding rounds up one short"),
    "A2": ("csrc/moe/align_permute_cpu.cpp", "static_cast<int32_t>(group_start[num_experts])",
           "static_cast<int32_t>(group_start[num_experts - 1])", "padded count misses the last expert's group"),
    "M1": ("csrc/moe/grouped_gemm_cpu.cpp", "silu_times(g[c], g[inter + c])", "silu_times(g[inter + c], g[c])",
           "gate and up halves swapped"),
    "M2": ("csrc/moe/grouped_gemm_cpu.cpp", "const float* row = down_ptr + (t * top_k + j) * hidden;",
           "const float* row = down_ptr + (t * top_k) * hidden;", "combine reads the first pair k times"),
    "M3": ("csrc/moe/grouped_gemm_cpu.cpp", "return gate / (1.f + std::exp(-gate)) * up;",
           "return gate / (1.f + std::exp(gate)) * up;", "SiLU sign flipped"),
    "P1": ("csrc/attention/paged_attention_cpu.cpp", "std::min<int64_t>(pos + 1, ctx_lens[b])",
           "std::min<int64_t>(pos, ctx_lens[b])", "causal mask drops the token's own key"),
    "P2": ("csrc/attention/paged_attention_cpu.cpp", "kv_head = h / group;", "kv_head = h % num_kv_heads;",
           "GQA head mapping h / group -> h % n_kv"),
    "P3": ("csrc/attention/paged_attention_cpu.cpp", "* block_size + j % block_size) * head_dim;",
           "* block_size + (j + 1) % block_size) * head_dim;", "key offset inside a block shifted by one"),
    "P4": ("csrc/attention/paged_attention_cpu.cpp", "scores[j] = std::exp(scores[j] - max_score);",
           "scores[j] = std::exp(scores[j]);", "softmax without subtracting the max"),
    "C1": ("csrc/attention/cache_ops_cpu.cpp", "if (slot < 0) continue;  // padding",
           "if (slot <= 0) continue;  // padding", "slot 0 treated as padding"),
    "C2": ("csrc/attention/cache_ops_cpu.cpp", "((block * num_kv_heads + h) * block_size + offset)",
           "((block * num_kv_heads + 0) * block_size + offset)", "every head written to head 0"),
    "R1": ("csrc/fused/add_rmsnorm_cpu.cpp", "sum_sq / static_cast<float>(hidden) + static_cast<float>(eps)",
           "sum_sq / static_cast<float>(hidden - 1) + static_cast<float>(eps)", "mean of squares over hidden - 1"),
    "R2": ("csrc/fused/add_rmsnorm_cpu.cpp", "xr[h] = static_cast<scalar_t>(static_cast<float>(w_ptr[h]) *",
           "xr[h] = static_cast<scalar_t>(static_cast<float>(w_ptr[0]) *", "every column scaled by weight[0]"),
    "Q1": ("csrc/fused/rope_cache_cpu.cpp", "const float b = x2 * cos[i] + x1 * sin[i];",
           "const float b = x2 * cos[i] - x1 * sin[i];", "rotation of the second half with the wrong sign"),
    "Q2": ("csrc/fused/rope_cache_cpu.cpp", "if (slot < 0) continue;  // padding: nothing written",
           "if (slot <= 0) continue;  // padding: nothing written", "slot 0 treated as padding"),
}

# id: why no test can tell the mutant from the original
EQUIVALENT = {
    "G2": "a NaN probability means the whole row is NaN (one NaN or inf logit makes the softmax sum NaN), so "
          "every expert ranks the same, -inf or +inf alike, and ties go to the lower index either way",
}


def tests_for(file: str) -> list:
    return MOE_TESTS if "/moe/" in file else FUSED_TESTS if "/fused/" in file else ATTENTION_TESTS


def run(cmd, cwd, log):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MAX_JOBS": "1", "XVERSE_NO_CUDA": "1", "XVERSE_NO_EMU": "1",
                                   "OMP_NUM_THREADS": "1", "PYTHONPATH": cwd})
        f.write(done.stdout)
    return done


def build(scratch, log) -> bool:
    return run([sys.executable, "setup.py", "build_ext", "--inplace"], scratch, log).returncode == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", help="mutant ids (default: all)")
    parser.add_argument("--scratch", default="/tmp/xverse-cpp-mutation")
    parser.add_argument("--out", default=None, help="markdown table here (default: print)")
    args = parser.parse_args(argv)
    scratch, log = args.scratch, os.path.join(args.scratch, "..", "cpp_mutation.log")
    if not os.path.isdir(os.path.join(scratch, "csrc")):
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
        for name in files:
            os.makedirs(os.path.dirname(os.path.join(scratch, name)) or scratch, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(scratch, name))
        # -O1 in the scratch copy only: a mutant changes what the code computes, not how well it is optimised,
        # and -O1 halves the compile of the template-heavy kernels on a busy 2-core machine
        setup_py = os.path.join(scratch, "setup.py")
        text = open(setup_py).read()
        assert text.count('cxx_flags = ["-O3"') == 1, "setup.py's cxx_flags line moved: update this script"
        open(setup_py, "w").write(text.replace('cxx_flags = ["-O3"', 'cxx_flags = ["-O1"'))
    if not build(scratch, log):
        sys.exit(f"the unmutated build fails: see {log}")
    rows = []
    for mutant_id in args.only or list(MUTANTS):
        file, old, new, meaning = MUTANTS[mutant_id]
        path = os.path.join(scratch, file)
        original = open(path).read()
        assert original.count(old) == 1, f"{mutant_id}: the original text is not found once in {file}"
        start = time.time()
        try:
            open(path, "w").write(original.replace(old, new))
            if not build(scratch, log):
                rows.append((mutant_id, file, meaning, "compile error", []))
                continue
            done = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests_for(file)],
                       scratch, log)
            failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, re.M)))
            crashed = done.returncode not in (0, 1)
            rows.append((mutant_id, file, meaning, "crash" if crashed else f"{len(failed)} failed", failed))
        finally:
            open(path, "w").write(original)
        print(f"{mutant_id}: {rows[-1][3]} ({time.time() - start:.0f} s)", flush=True)
        write_table(rows, args.out)   # partial results survive an interrupted run
    build(scratch, log)   # leave the scratch build unmutated
    print(write_table(rows, args.out))


def write_table(rows, out=None) -> str:
    lines = ["| mutant | file | change | result | killed by |", "|---|---|---|---|---|"]
    for mutant_id, file, meaning, result, failed in rows:
        if not failed and result.startswith("0"):
            killers = "SURVIVED" + (f": equivalent, {EQUIVALENT[mutant_id]}" if mutant_id in EQUIVALENT else "")
        else:
            names = [f.split("::", 1)[1] if "::" in f else f for f in failed]
            killers = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        lines.append(f"| {mutant_id} | {os.path.basename(file)} | {meaning} | {result} | {killers} |")
    table = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main()
