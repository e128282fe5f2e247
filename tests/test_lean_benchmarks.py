"""Smoke runs of the lean decode path's benchmarks: the decode-GEMM section of bench_moe and the CPU decode
benchmark (before vs after in one run). Numbers here are not judged (a shared CPU), only their presence."""
import json

from benchmarks import decode_cpu
from benchmarks.kernels import bench_moe


def test_bench_moe_decode_section(tmp_path):
    out = tmp_path / "moe.json"
    bench_moe.main(["--device", "cpu", "--sections", "decode", "--hidden", "64", "--inter", "32", "--experts", "8",
                    "--top-k", "2", "--shared", "2", "--decode-tokens", "1", "4", "--warmup", "0", "--iters", "1",
                    "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    stages = {(r["tokens"], r["method"]) for r in rows}
    assert stages == {(t, s) for t in (1, 4) for s in ("decode:gate_up", "decode:down_combine")}
    for row in rows:
        assert row["block_m"] == 8 and row["gb_s"] > 0 and row["bytes"] > 0
        assert row["distinct_experts"] >= 2 + 2 * (row["tokens"] == 1)  # the 2 shared + the routed picks


def test_decode_cpu_before_and_after(tmp_path):
    out = tmp_path / "decode.json"
    decode_cpu.main(["--batch", "1", "--new-tokens", "3", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["before (unfused)", "after (lean)"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
