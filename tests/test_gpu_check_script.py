"""scripts/gpu_check.sh spends a GPU lease only on our real kernels: it passes --kernels cuda to every
end-to-end run, runs no benchmark when the build or the GPU tests fail, and fits its budget (< 8 minutes).
Checked here with a stand-in python that records every command instead of running it."""
import os
import re
import subprocess
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def run_script(tmp_path, build_rc=0, tests_rc=0):
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake_python"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        [[ "$1" == "-" ]] && exec python3 "$@"          # the script's own summary step runs for real
        echo "$*" >> {log}
        case "$*" in
          *"pip install"*|*setup.py*|*built_with_cuda*) exit {build_rc} ;;
          *"-m pytest"*) exit {tests_rc} ;;
        esac
        exit 0
        """))
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), PATH=f"{tmp_path}:{os.environ['PATH']}")
    done = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


def benchmark_calls(calls):
    return [c for c in calls if "-m benchmarks." in c]


@pytest.mark.parametrize("build_rc, tests_rc", [(1, 0), (0, 1)])
def test_no_benchmark_runs_when_the_build_or_the_gpu_tests_fail(tmp_path, build_rc, tests_rc):
    done, calls = run_script(tmp_path, build_rc, tests_rc)
    assert done.returncode != 0
    assert benchmark_calls(calls) == [], calls
    assert "blocked" in done.stdout


def test_end_to_end_runs_use_the_cuda_kernels_within_budget(tmp_path):
    done, calls = run_script(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]
    end_to_end = [c for c in benchmark_calls(calls) if "benchmarks.latency" in c or "benchmarks.throughput" in c]
    assert len(end_to_end) >= 3
    assert all("--kernels cuda" in c for c in end_to_end), end_to_end
    budget = int(re.search(r"budget (\d+)s", done.stdout).group(1))
    limits = [int(s) for s in re.findall(r"\(timeout (\d+)s\)", done.stdout)]
    assert budget <= 450 and limits and max(limits) <= budget   # 8 minutes less time to start and copy back
