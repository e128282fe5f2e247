"""benchmarks/serve_bench.py end to end at tiny sizes on CPU: offline run, a real server, saturation and load
levels; the JSON has the numbers the report needs and they add up, and the plot is written."""
import json
import os
import sys

import pytest

pytest.importorskip("fastapi", reason="the [test] extra installs the [serve] extra")
pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: benchmarks/
from benchmarks import serve_bench  # noqa: E402


def test_serve_bench_json_and_plot(tmp_path):
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    payload = serve_bench.main(["--device", "cpu", "--num-prompts", "3", "--input-len", "5", "--output-len", "4",
                                "--concurrency", "1", "--request-rate", "50,inf", "--repeats", "2", "--torch-threads", "1",
                                "--max-num-seqs", "2", "--json", str(out), "--plot", str(png)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    assert png.stat().st_size > 10_000
    offline, saturation = saved["offline"], saved["saturation"]
    assert saved["workload"]["saturates"]   # 3 requests, 2 at a time: one always waits
    assert (offline["requests"], offline["output_tokens"]) == (3, 3 * 4)
    assert [lv["load"] for lv in saved["levels"]] == ["c=1", "50 req/s", "inf req/s"]
    for level in [saturation] + saved["levels"]:
        assert level["errors"] == 0, level["first_error"]
        assert (level["requests"], level["output_tokens"]) == (3, 3 * 4)   # usage counted every token
        assert level["requests_per_s"] > 0 and level["output_tokens_per_s"] > 0
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            q = level[metric]
            assert 0 < q["p50"] <= q["p90"] <= q["p99"], (metric, q)
        assert level["ttft_s"]["p99"] <= level["e2e_s"]["p99"]
    assert saved["saturation_fraction_of_offline"] == pytest.approx(
        saturation["output_tokens_per_s"] / offline["output_tokens_per_s"])
    assert 0 < saturation["engine_busy_fraction"] <= 1.05
    # a fair comparison: the same torch threads on both sides, each server run right after offline's on the
    # same requests, and the server's streamed texts checked against offline's
    assert saved["engine"]["torch_threads"] == {"offline": 1, "server": 1}
    assert saved["runs"] == "offline and server interleaved, pair by pair"
    assert saturation["all_outputs_equal_offline"] == [3, 3]
    pairs = saturation["all_fraction_of_paired_offline"]
    assert len(pairs) == 2 and saved["saturation_fraction_median_of_pairs"] == pytest.approx(sum(pairs) / 2)


def test_quartiles_of_pair_ratios():
    assert serve_bench.quartiles([0.9, 1.0, 0.8, 1.1, 0.95]) == pytest.approx((0.9, 1.0))
    assert serve_bench.quartiles([0.97]) == (0.97, 0.97)
