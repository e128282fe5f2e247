"""The benchmarks run end to end on CPU at tiny sizes, and their baseline computes what the engine computes.

- benchmarks/throughput.py and benchmarks/latency.py: main() on a small checkpoint writes a JSON with the
  expected keys and sensible numbers (counts add up, rates positive, percentiles ordered).
- benchmarks/reference_path.py (the HF-style per-expert loop the engine is compared with) gives the same
  greedy tokens as Engine.generate, on padded batches of mixed lengths: the ratio compares equal work.
- The roofline arithmetic reproduces MODEL.md's numbers for the real config.
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: benchmarks/
from benchmarks import latency, throughput  # noqa: E402
from benchmarks.reference_path import ReferencePath  # noqa: E402
from checkpoints import make_checkpoint, make_preset_checkpoint  # noqa: E402
from xverse_engine import Engine, SamplingParams  # noqa: E402
from xverse_engine.config import ASSETS_DIR, ModelConfig  # noqa: E402

TINY = dict(max_position_embeddings=256, rope_theta=10000, tokenizer=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("bench"), **TINY))


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_throughput_json(ckpt, tmp_path):
    out = tmp_path / "t.json"
    payload = throughput.main(["--model", ckpt, "--device", "cpu", "--num-prompts", "5", "--input-len", "12",
                               "--output-len", "4", "--num-kv-blocks", "32", "--compare-reference",
                               "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    for key in ("benchmark", "machine", "engine", "workload", "results", "roofline", "reference",
                "speedup_vs_reference", "max_batch_that_fits"):
        assert key in saved, key
    res = saved["results"]
    assert (res["num_requests"], res["input_tokens"], res["output_tokens"]) == (5, 5 * 12, 5 * 4)
    for key in ("elapsed_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
                "fraction_of_decode_ceiling"):
        assert positive(res[key]), key
    assert res["total_tokens_per_s"] == pytest.approx(res["output_tokens_per_s"] * (12 + 4) / 4)
    roof = saved["roofline"]
    for key in ("hbm_bytes_per_s", "matmul_flops_per_s", "bytes_per_step", "ceiling_tokens_per_s"):
        assert positive(roof[key]), key
    assert roof["batch"] == 5 and roof["bound"] in ("memory", "compute")
    ref = saved["reference"]
    assert ref["output_tokens"] == 5 * 4 and positive(ref["output_tokens_per_s"])
    assert saved["speedup_vs_reference"] == pytest.approx(res["output_tokens_per_s"] / ref["output_tokens_per_s"])


def test_throughput_random_lengths(ckpt):
    payload = throughput.main(["--model", ckpt, "--device", "cpu", "--num-prompts", "6", "--input-len", "10",
                               "--output-len", "4", "--range-ratio", "0.5", "--num-kv-blocks", "32"])
    res = payload["results"]
    assert res["num_requests"] == 6
    assert 6 * 5 <= res["input_tokens"] <= 6 * 15 and 6 * 2 <= res["output_tokens"] <= 6 * 6
    assert res["input_tokens"] != 60 or res["output_tokens"] != 24     # lengths really vary


def test_throughput_max_batch_from_kv_capacity(ckpt):
    # 40 blocks of 16 tokens; a request of 20 + 12 tokens needs 2 blocks: 20 fit at once.
    payload = throughput.main(["--model", ckpt, "--device", "cpu", "--max-batch", "--input-len", "20",
                               "--output-len", "12", "--num-kv-blocks", "40"])
    assert payload["engine"]["kv_capacity_tokens"] == 40 * 16
    assert payload["max_batch_that_fits"] == payload["results"]["num_requests"] == (40 * 16) // 32
    assert payload["results"]["num_preemptions"] == 0
    assert payload["results"]["output_tokens"] == 20 * 12


def test_latency_json(ckpt, tmp_path):
    out = tmp_path / "l.json"
    latency.main(["--model", ckpt, "--device", "cpu", "--batch-size", "2", "--input-len", "12", "--output-len", "5",
                  "--warmup-iters", "1", "--iters", "2", "--num-kv-blocks", "32", "--compare-reference",
                  "--json", str(out)])
    saved = json.loads(out.read_text())
    for key in ("benchmark", "machine", "engine", "workload", "results", "roofline", "reference",
                "speedup_vs_reference"):
        assert key in saved, key
    for path in ("results", "reference"):
        res = saved[path]
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            q = res[metric]
            assert 0 < q["p50"] <= q["p90"] <= q["p99"], (path, metric, q)
        assert res["ttft_s"]["p50"] < res["e2e_s"]["p50"] and res["tpot_s"]["p50"] < res["e2e_s"]["p50"]
        assert positive(res["output_tokens_per_s"]) and positive(res["decode_tokens_per_s"])
    assert saved["results"]["ttft_s"]["n"] == 2 * 2                  # one sample per request per iteration
    assert positive(saved["results"]["fraction_of_decode_ceiling"])
    assert all(positive(v) for v in saved["speedup_vs_reference"].values())


def test_percentiles_interpolate():
    q = latency.percentiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (q["p50"], q["mean"], q["n"]) == (3.0, 3.0, 5)
    assert q["p90"] == pytest.approx(4.6) and q["p99"] == pytest.approx(4.96)


@pytest.mark.parametrize("preset", ["moe", "real-head", "gqa", "dense"])
def test_reference_path_matches_engine_greedy(tmp_path, preset):
    """Mixed prompt lengths (left padding in the reference, paged cache in the engine): same tokens."""
    kwargs = dict(max_position_embeddings=256, tokenizer=False)
    path = make_checkpoint(tmp_path, **kwargs) if preset == "moe" else make_preset_checkpoint(tmp_path, preset, **kwargs)
    engine = Engine(str(path), device="cpu", num_kv_blocks=32, show_progress=False)
    prompts = [[(7 * i + 13 * j) % 490 + 10 for j in range(n)] for i, n in enumerate([9, 1, 4, 17])]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    expected = [out.token_ids for out in engine.generate(prompt_token_ids=prompts, sampling_params=params)]
    reference = ReferencePath(engine.model, engine.config)
    assert reference.generate(prompts, 6) == expected
    timing = reference.last_timing
    assert 0 < timing["ttft_s"] < timing["e2e_s"] and timing["tpot_s"] > 0
    # it shares the engine's weights instead of copying them
    assert reference.model.layers[0].self_attn.qkv_proj.weight.data_ptr() == \
        engine.model.layers[0].self_attn.qkv_proj.weight.data_ptr()


def test_roofline_arithmetic_matches_model_md():
    """MODEL.md: distinct experts 6/35/51/61/64 at batch 1/8/16/32/64; batch-1 decode reads ~7.9 GB in bf16
    (~420 tokens/s at 3.35 TB/s); KV is 280 KB per token."""
    config = ModelConfig.from_pretrained(os.path.join(ASSETS_DIR, "xverse-moe-a4.2b"))
    distinct = [throughput.expected_distinct_experts(64, 6, b) for b in (1, 8, 16, 32, 64)]
    assert [round(d) for d in distinct] == [6, 35, 51, 61, 64]
    step = throughput.decode_step_cost(config, 2, 2, batch=1, context_len=0)
    assert step["weight_bytes_per_step"] == pytest.approx(7.9e9, rel=0.02)
    assert 3.35e12 / step["bytes_per_step"] == pytest.approx(420, rel=0.02)
    one_more = throughput.decode_step_cost(config, 2, 2, batch=1, context_len=1)
    assert one_more["kv_bytes_per_step"] - step["kv_bytes_per_step"] == 28 * 2 * 2560 * 2   # 280 KB per token
    full = throughput.decode_step_cost(config, 2, 2, batch=64, context_len=0)
    assert full["weight_bytes_per_step"] == pytest.approx(51.6e9, rel=0.02)   # nearly every expert


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests time tiny ops; two threads on a busy 2-core runner make each op wait for the other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_host_overhead_json_and_its_goals(tmp_path):
    from benchmarks import host_overhead
    out = tmp_path / "h.json"
    payload = host_overhead.main(["--batch-sizes", "1", "--sampling", "greedy", "topk_topp_logprobs", "--context",
                                  "40", "--steps", "3", "--repeats", "2", "--warmup", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == payload["results"] and saved["settings"]["kernels"] == "auto"
    greedy, sampled = payload["results"]
    assert (greedy["batch"], greedy["sampling"], greedy["goal_ms"]) == (1, "greedy", 0.1)
    assert sampled["goal_ms"] is None and sampled["meets_goal_cpu"] is None
    for row in payload["results"]:
        assert positive(row["wall_ms"]) and positive(row["cpu_ms"])
        assert row["wall_min_ms"] <= row["wall_ms"] <= row["wall_max_ms"]


def test_host_time_hidden_under_the_gpu():
    from benchmarks.host_overhead import hidden_fraction
    assert hidden_fraction(host_ms=1.0, gpu_ms=25.0, wall_ms=25.0) == 1.0     # prepared while the GPU ran
    assert hidden_fraction(host_ms=1.0, gpu_ms=25.0, wall_ms=26.0) == 0.0     # host and GPU took turns
    assert hidden_fraction(host_ms=2.0, gpu_ms=25.0, wall_ms=25.5) == pytest.approx(0.75)
    assert hidden_fraction(host_ms=1.0, gpu_ms=25.0, wall_ms=24.0) == 1.0     # clipped (timer noise)


def test_host_overhead_needs_a_gpu_to_simulate_one(capsys):
    from benchmarks import host_overhead
    with pytest.raises(SystemExit):
        host_overhead.parse_args(["--simulate-gpu-ms", "25"])
    assert "--simulate-gpu-ms needs a CUDA device" in capsys.readouterr().err
