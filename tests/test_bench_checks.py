"""The benchmarks' numbers are right, not just positive, and the kernel benchmarks refuse to time wrong kernels.

- The decode roofline of the real XVERSE-MoE-A4.2B config, term by term from MODEL.md, to the byte and FLOP.
- Every fraction a benchmark reports is achieved / ceiling, with the ceiling the slower of bytes / bandwidth
  and FLOPs / peak at the roofline the run measured (pinned here so the arithmetic can be checked exactly).
- benchmarks/kernels/bench_moe.py and bench_attention.py compare each kernel with a reference before timing
  it: a wrong result stops them with exit status 1, a crash propagates; both run as smoke tests on CPU.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is a package at the repo root
from benchmarks import latency, throughput  # noqa: E402
from benchmarks.kernels import bench_attention, bench_moe  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from xverse_engine.config import ASSETS_DIR, ModelConfig  # noqa: E402
from xverse_engine.ops import moe as moe_ops  # noqa: E402

# MODEL.md, XVERSE-MoE-A4.2B: H 2560, 28 layers, 64 experts (top 6) of I 1728, shared 2 x 1728, V 100534, bf16
H, L, E, K, I, V, BF16 = 2560, 28, 64, 6, 1728, 100534, 2
ATTENTION = 4 * H * H * BF16                 # q, k, v, o: "52 MB per layer"
EXPERT = 3 * H * I * BF16                    # gate, up, down: "26.5 MB"
SHARED = 3 * H * 2 * I * BF16                # "53 MB"
ROUTER = E * H * 4                           # fp32
NORMS = 2 * H * BF16
LM_HEAD = V * H * BF16
KV_PER_TOKEN = L * 2 * H * BF16              # "280 KB per token": 286,720 B


@pytest.fixture(scope="module")
def real_config():
    return ModelConfig.from_pretrained(os.path.join(ASSETS_DIR, "xverse-moe-a4.2b"))


def test_batch1_decode_reads_the_model_md_bytes_exactly(real_config):
    cost = throughput.decode_step_cost(real_config, BF16, BF16, batch=1, context_len=0)
    layer = ATTENTION + K * EXPERT + SHARED + ROUTER + NORMS
    weights = L * layer + LM_HEAD + H * BF16 + H * BF16             # + final norm, + the token's embedding row
    assert KV_PER_TOKEN == 286_720
    assert cost["weight_bytes_per_step"] == weights == 7_946_813_440
    assert cost["kv_bytes_per_step"] == KV_PER_TOKEN                  # the new token's K and V are written
    assert cost["bytes_per_step"] == 7_947_100_160                    # ~7.95e9 bytes per token at batch 1


def test_decode_kv_bytes_grow_by_286720_per_context_token_and_sequence(real_config):
    for batch, context in ((1, 1), (8, 1000), (64, 4096)):
        cost = throughput.decode_step_cost(real_config, BF16, BF16, batch=batch, context_len=context)
        assert cost["kv_bytes_per_step"] == batch * (context + 1) * KV_PER_TOKEN


def test_decode_flops_are_two_per_active_matmul_weight_plus_attention(real_config):
    """MODEL.md: 4,226,183,680 active parameters per token. All but the embedding (a lookup) and the norms
    (elementwise) are matmul weights: 2 FLOPs each. Attention adds QK^T and PV: 4 * heads * head_dim per
    context token per layer."""
    matmul_weights = 4_226_183_680 - V * H - (2 * L + 1) * H
    for batch, context in ((1, 0), (1, 1000), (16, 2048)):
        cost = throughput.decode_step_cost(real_config, BF16, BF16, batch=batch, context_len=context)
        assert cost["flops_per_step"] == batch * (2 * matmul_weights + 4 * L * 32 * 80 * context)


def test_ceiling_is_the_slower_of_memory_and_compute(real_config):
    engine = SimpleNamespace(config=real_config, dtype=torch.bfloat16)
    measured = {"hbm_bytes_per_s": 3.35e12, "matmul_flops_per_s": 990e12}      # MODEL.md's H100 numbers
    memory = throughput.decode_ceiling(engine, 1, 0, measured)
    assert memory["bound"] == "memory"
    assert memory["ceiling_tokens_per_s"] == pytest.approx(3.35e12 / 7_947_100_160)   # ~420 tokens/s
    slow_math = {"hbm_bytes_per_s": 3.35e12, "matmul_flops_per_s": 1e9}
    compute = throughput.decode_ceiling(engine, 4, 0, slow_math)
    assert compute["bound"] == "compute"
    assert compute["ceiling_tokens_per_s"] == pytest.approx(4 / (compute["flops_per_step"] / 1e9))


# ---- the fractions the end-to-end benchmarks report ---------------------------------------------------------

PINNED_ROOFLINE = {"hbm_bytes_per_s": 2.0e10, "matmul_flops_per_s": 5.0e10}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("bench_checks"), max_position_embeddings=256,
                               rope_theta=10000, tokenizer=False))


@pytest.fixture
def pinned_roofline(monkeypatch):
    """The measured roofline, fixed: the checks below recompute the ceiling from it exactly."""
    monkeypatch.setattr(throughput, "measure_roofline", lambda device: dict(PINNED_ROOFLINE))
    monkeypatch.setattr(latency, "measure_roofline", lambda device: dict(PINNED_ROOFLINE))


def expected_ceiling(config, batch, context):
    cost = throughput.decode_step_cost(config, 4, 4, batch, context)           # fp32 on the CPU
    step_s = max(cost["bytes_per_step"] / PINNED_ROOFLINE["hbm_bytes_per_s"],
                 cost["flops_per_step"] / PINNED_ROOFLINE["matmul_flops_per_s"])
    return cost, batch / step_s


def test_throughput_fraction_is_output_rate_over_ceiling(tiny_ckpt, pinned_roofline):
    payload = throughput.main(["--model", tiny_ckpt, "--device", "cpu", "--num-prompts", "4", "--input-len", "10",
                               "--output-len", "3", "--num-kv-blocks", "32"])
    roof, res = payload["roofline"], payload["results"]
    config = ModelConfig.from_pretrained(tiny_ckpt)
    cost, ceiling = expected_ceiling(config, batch=4, context=10 + 3 / 2)
    assert (roof["batch"], roof["context_len"]) == (4, 11.5)
    assert roof["bytes_per_step"] == cost["bytes_per_step"] and roof["flops_per_step"] == cost["flops_per_step"]
    assert roof["ceiling_tokens_per_s"] == pytest.approx(ceiling)
    assert res["fraction_of_decode_ceiling"] == pytest.approx(res["output_tokens_per_s"] / ceiling)
    assert res["output_tokens_per_s"] == pytest.approx(res["output_tokens"] / res["elapsed_s"])


def test_latency_fraction_is_decode_rate_over_ceiling(tiny_ckpt, pinned_roofline):
    payload = latency.main(["--model", tiny_ckpt, "--device", "cpu", "--batch-size", "2", "--input-len", "8",
                            "--output-len", "4", "--warmup-iters", "0", "--iters", "1", "--num-kv-blocks", "32"])
    roof, res = payload["roofline"], payload["results"]
    config = ModelConfig.from_pretrained(tiny_ckpt)
    _, ceiling = expected_ceiling(config, batch=2, context=8 + 4 / 2)
    assert roof["ceiling_tokens_per_s"] == pytest.approx(ceiling)
    assert res["decode_tokens_per_s"] == pytest.approx(2 / res["tpot_s"]["p50"])
    assert res["fraction_of_decode_ceiling"] == pytest.approx(res["decode_tokens_per_s"] / ceiling)


# ---- kernel micro-benchmarks: smoke, and loud failure ---------------------------------------------------------

MOE_ARGS = ["--device", "cpu", "--tokens", "1", "5", "--experts", "8", "--top-k", "2", "--hidden", "32",
            "--inter", "16", "--warmup", "0", "--iters", "1"]


@pytest.fixture
def quick_measurements(monkeypatch):
    """Skips measuring the machine (seconds on a busy CPU); these tests check results, not speed."""
    for module in (bench_moe, bench_attention):
        monkeypatch.setattr(module, "measure_memory_bandwidth", lambda device, *a, **k: 1e10)
    monkeypatch.setattr(bench_moe, "measure_matmul_peak", lambda device, *a, **k: 1e11)
    monkeypatch.setattr(bench_attention, "CPU_SHAPES", [(1, 40), (3, 19)])
    monkeypatch.setattr(bench_attention, "CPU_GQA_SHAPES", [(2, 21)])


def test_bench_moe_smoke(tmp_path, quick_measurements):
    payload = bench_moe.main(MOE_ARGS + ["--json", str(tmp_path / "moe.json")])
    saved = json.loads((tmp_path / "moe.json").read_text())
    ours = [r for r in saved["results"] if r["method"] == "ours"]
    assert [r["tokens"] for r in ours] == [1, 5] and all(r["ok"] and r["us"] > 0 for r in ours)
    assert payload["results"] == saved["results"]


def test_bench_moe_refuses_a_wrong_kernel(monkeypatch, quick_measurements):
    correct = moe_ops.fused_moe
    monkeypatch.setattr(moe_ops, "fused_moe", lambda *a, **k: correct(*a, **k) * 1.01)
    with pytest.raises(bench_moe.KernelCheckFailed, match="T=1 ours"):
        bench_moe.main(MOE_ARGS)


def test_bench_moe_does_not_hide_a_crashing_kernel(monkeypatch, quick_measurements):
    def crash(*args, **kwargs):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(moe_ops, "fused_moe", crash)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_moe.main(MOE_ARGS)


def test_bench_attention_smoke(tmp_path, quick_measurements):
    payload = bench_attention.main(["--device", "cpu", "--dtype", "float32", "--iters", "1", "--warmup", "0",
                                    "--json", str(tmp_path / "attn.json")])
    rows = json.loads((tmp_path / "attn.json").read_text())["results"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 40), (3, 19)]
    assert all(r["ok"] and r["max_abs_diff_vs_sdpa"] < 1e-4 for r in rows) and payload["results"] == rows
    gqa = payload["gqa_results"]
    assert [(r["batch"], r["context"], r["heads"], r["kv_heads"]) for r in gqa] == [(2, 21, 32, 8)]
    assert all(r["ok"] and r["max_abs_diff_vs_sdpa"] < 1e-4 for r in gqa)
    # each KV byte once: 2 (K, V) x B x ctx x Hkv x D x 4 bytes (fp32), not x Hq
    assert gqa[0]["mbytes"] * 1e6 == 2 * 2 * 21 * 8 * 128 * 4


def test_bench_attention_arithmetic_counts_gqa_kv_bytes_once():
    rows = {r["shape"]: r for r in bench_attention.arithmetic_rows() if r["kind"] == "decode GQA"}
    row = rows["B=1 ctx=8192 32q/8kv x128"]
    assert row["mbytes"] * 1e6 == 2 * 8192 * 8 * 128 * 2  # bf16 K and V of 8 KV heads
    assert row["gflop"] * 1e9 == 4 * 8192 * 32 * 128       # every query head's QK and PV


def test_bench_attention_refuses_a_wrong_kernel(monkeypatch, quick_measurements):
    correct = bench_attention.paged_decode
    monkeypatch.setattr(bench_attention, "paged_decode", lambda q, *a: correct(q, *a) + 0.01)
    with pytest.raises(bench_attention.KernelCheckFailed, match="B=1 ctx=40"):
        bench_attention.main(["--device", "cpu", "--dtype", "float32", "--iters", "1", "--warmup", "0"])


PLANT_AND_RUN = """
import runpy, sys
sys.path.insert(0, {root!r})
import torch, benchmarks.common as common, xverse_engine.ops.moe as moe
common.measure_memory_bandwidth = lambda device, *a, **k: 1e10   # skip measuring the machine
common.measure_matmul_peak = lambda device, *a, **k: 1e11
correct = moe.fused_moe
moe.fused_moe = lambda *a, **k: correct(*a, **k) + 1.0
sys.argv = ["bench_moe"] + {args!r}
runpy.run_module("benchmarks.kernels.bench_moe", run_name="__main__")
"""


def test_bench_moe_exits_nonzero_on_a_wrong_kernel():
    """As a script: the wrong kernel is named on stderr and the exit status is 1 (a CI step fails)."""
    code = PLANT_AND_RUN.format(root=ROOT, args=MOE_ARGS + ["--tokens", "3"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "FAILED" in done.stderr and "T=3 ours" in done.stderr
