"""Micro-benchmark of the routed MoE block (gating + align + gate_up + down/combine), our kernels beside
(a) the per-expert loop of the model's reference code and (b) torch's own grouped GEMM where present.

    python -m benchmarks.kernels.bench_moe                      # GPU: real shapes, T = 1 .. 4096
    python -m benchmarks.kernels.bench_moe --device cpu --json /tmp/moe.json   # small shapes on the CPU
    python -m benchmarks.kernels.bench_moe --sections decode --device cpu --hidden 2560 --inter 1728 \
        --dtype bfloat16                                         # the decode GEMMs, real shapes, on the CPU

Two sections: "block" (the routed block three ways, T = 1 .. 4096) and "decode" (the decode GEMMs alone at
T = 1, 4, 16, 64: block_m 8, tokens on the narrow side of the MMA, 6 routed + 2 shared experts per token,
reported as achieved GB/s of weight streaming and the fraction of the measured bandwidth; the goal on an
H100/H200 is >= 80% at T = 1). On the CPU the decode section only covers the shapes: the numbers say
nothing about the GPU kernel.

Every number comes with its roofline: bytes actually touched (weights of the distinct experts the routing
picked, the router, activations in and out) over the measured device bandwidth, and FLOPs over the
measured bf16 matmul peak, both measured in the same run (benchmarks/common.py).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import (machine_info, measure_matmul_peak, measure_memory_bandwidth, print_table,
                               time_fn, write_json)
from xverse_engine.ops import extension_available, extension_built_with_cuda
from xverse_engine.ops import moe

GPU_TOKENS = [1, 8, 32, 64, 256, 1024, 4096]
CPU_TOKENS = [1, 8, 32, 64]
DECODE_TOKENS = [1, 4, 16, 64]
# Largest |ours - per-expert loop| allowed, relative to the largest |output|: fp32 differs only by summation
# order; bf16 (u = 2^-8) by the activation rounded between the GEMMs and the output's rounding (4u).
MAX_RELATIVE_DIFF = {torch.float32: 1e-4, torch.float16: 4 * 2.0 ** -11, torch.bfloat16: 4 * 2.0 ** -8}


class KernelCheckFailed(RuntimeError):
    """A kernel of ours gave a wrong result: the benchmark must not publish its timing."""


# ---- the block three ways ----------------------------------------------------------------------------

def ours(kernels):
    def run(x, router, w13, w2, top_k):
        return moe.fused_moe(x, router, w13, w2, top_k, kernels=kernels)
    return run


def per_expert_loop(x, router, w13, w2, top_k):
    """The model reference's loop: route, then for each expert gather its tokens, SwiGLU, index_add."""
    inter = w13.shape[1] // 2
    probs = torch.softmax(x.float() @ router.t(), dim=-1)
    vals, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    vals, ids = vals[:, :top_k], ids[:, :top_k]
    weights = (vals / (vals.sum(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(router.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = F.silu(xe @ w13[e, :inter].t()) * (xe @ w13[e, inter:].t())
        out = out.index_add(0, tok, (h @ w2[e].t()) * weights[tok, slot, None])
    return out


def grouped_mm_fn():
    """torch's grouped GEMM (torch.nn.functional.grouped_mm, else torch._grouped_mm), or None."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def torch_grouped(x, router, w13, w2, top_k):
    """Route, sort pairs by expert (a permuted copy), two grouped GEMMs, unpermute and weighted sum."""
    grouped_mm = grouped_mm_fn()
    num_experts, inter = router.shape[0], w13.shape[1] // 2
    weights, ids = moe.gating_topk_torch(x, router, top_k)
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices                     # pairs grouped by expert
    offs = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0).to(torch.int32)  # [E] group ends
    xs = x[order // top_k]                                            # [P, H] permuted copy
    gate_up = grouped_mm(xs, w13.transpose(-2, -1), offs=offs)        # [P, 2I]
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    down = grouped_mm(act, w2.transpose(-2, -1), offs=offs)           # [P, H]
    out = torch.empty_like(down)
    out[order] = down
    return (out.view(x.shape[0], top_k, -1).float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)


# ---- accounting ----------------------------------------------------------------------------------------

def traffic(x, router, w13, w2, top_k, ids):
    """(bytes touched, FLOPs) of one routed block: distinct experts' weights, router, x in, out."""
    num_tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    distinct = int(torch.unique(ids).numel())
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    nbytes = distinct * expert_bytes + router.numel() * 4 + 2 * num_tokens * hidden * x.element_size()
    flops = 6 * num_tokens * top_k * hidden * inter + 2 * num_tokens * hidden * router.shape[0]
    return nbytes, flops, distinct


def bench_tokens(num_tokens, weights, args, device, roof, kernels):
    router, w13, w2 = weights
    hidden = w13.shape[2]
    gen = torch.Generator(device="cpu").manual_seed(num_tokens)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 0.1).to(w13.dtype).to(device)
    _, ids = moe.gating_topk_torch(x, router, args.top_k)
    nbytes, flops, distinct = traffic(x, router, w13, w2, args.top_k, ids)
    methods = {"ours": ours(kernels), "per_expert_loop": per_expert_loop}
    if grouped_mm_fn() is not None:
        methods["torch_grouped_mm"] = torch_grouped
    expected = per_expert_loop(x, router, w13, w2, args.top_k).float()
    scale = expected.abs().max().item()
    rows = []
    for name, fn in methods.items():
        row = {"tokens": num_tokens, "method": name, "distinct_experts": distinct, "bytes": nbytes, "flops": flops}
        try:
            out = fn(x, router, w13, w2, args.top_k)
        except (RuntimeError, TypeError, NotImplementedError) as error:  # e.g. grouped_mm's dtype/shape limits
            if name == "ours":
                raise   # our kernel crashing is a failure, not a row
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            rows.append(row)
            continue
        row["max_rel_diff"] = (out.float() - expected).abs().max().item() / max(scale, 1e-30)
        row["ok"] = bool(row["max_rel_diff"] <= MAX_RELATIVE_DIFF[x.dtype])   # NaN fails too
        stats = time_fn(lambda: fn(x, router, w13, w2, args.top_k), device, args.warmup, args.iters)
        us = stats["median_us"]
        row.update(us=us, min_us=stats["min_us"], tb_s=nbytes / (us * 1e-6) / 1e12,
                   tflop_s=flops / (us * 1e-6) / 1e12)
        row["frac_hbm"] = nbytes / (us * 1e-6) / roof["bandwidth_bytes_s"]
        row["frac_peak"] = flops / (us * 1e-6) / roof["matmul_flop_s"]
        rows.append(row)
    rows += bench_our_stages(x, router, w13, w2, args, device, roof, kernels, nbytes)
    return rows


def bench_our_stages(x, router, w13, w2, args, device, roof, kernels, nbytes):
    """Our block stage by stage: gating + align, gate_up, down + combine."""
    top_k, num_tokens = args.top_k, x.shape[0]
    num_experts, inter, hidden = router.shape[0], w13.shape[1] // 2, x.shape[1]
    block_m = moe.choose_block_m(num_tokens * top_k, num_experts)
    gating, align = moe.op("gating_topk", kernels), moe.op("moe_align", kernels)
    gate_up, down = moe.op("moe_gate_up", kernels), moe.op("moe_down_combine", kernels)
    weights, ids = gating(x, router, top_k)
    layout = align(ids, num_experts, block_m)
    act = gate_up(x, w13, *layout, top_k, block_m)
    pairs = num_tokens * top_k
    stages = {
        "ours:gating+align": (lambda: align(gating(x, router, top_k)[1], num_experts, block_m), 0),
        "ours:gate_up": (lambda: gate_up(x, w13, *layout, top_k, block_m), 4 * pairs * hidden * inter),
        "ours:down_combine": (lambda: down(act, w2, *layout, weights, None, block_m), 2 * pairs * hidden * inter),
    }
    rows = []
    for name, (fn, flops) in stages.items():
        us = time_fn(fn, device, args.warmup, args.iters)["median_us"]
        row = {"tokens": num_tokens, "method": name, "block_m": block_m, "us": us,
               "tflop_s": flops / (us * 1e-6) / 1e12 if flops else None}
        if flops:
            row["frac_peak"] = row["tflop_s"] * 1e12 / roof["matmul_flop_s"]
        rows.append(row)
    return rows


def bench_decode_gemm(num_tokens, args, device, roof, kernels, hidden, inter, dtype):
    """The decode GEMMs at block_m = 8 over E routed + S shared experts (stacked [E + S, ...]): gate_up, and
    down + combine. Bytes: the weights of the distinct experts the step reads (routed picks + the shared ones),
    plus activations in and out; at decode that is all that matters."""
    num_experts, num_shared, top_k = args.experts, args.shared, args.top_k
    stacked = num_experts + num_shared
    gen = torch.Generator(device="cpu").manual_seed(1000 + num_tokens)
    router = (torch.randn(num_experts, hidden, generator=gen) * 0.1).to(device)
    w13, w2 = _decode_weights(stacked, hidden, inter, dtype, device)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 0.1).to(dtype).to(device)
    block_m = moe.DECODE_BLOCK_M  # forced, also at T = 16 / 64 where choose_block_m would take 16
    gating, align = moe.op("gating_topk", kernels), moe.op("moe_align", kernels)
    gate_up, down = moe.op("moe_gate_up", kernels), moe.op("moe_down_combine", kernels)
    weights, ids = gating(x, router, top_k, num_shared)
    layout = align(ids, stacked, block_m)
    pairs_per_token = top_k + num_shared
    act = gate_up(x, w13, *layout, pairs_per_token, block_m)
    distinct = int(torch.unique(ids).numel())
    elem = w13.element_size()
    pairs = num_tokens * pairs_per_token
    stages = {
        "decode:gate_up": (lambda: gate_up(x, w13, *layout, pairs_per_token, block_m),
                           distinct * 2 * inter * hidden * elem + num_tokens * hidden * elem + pairs * inter * elem),
        "decode:down_combine": (lambda: down(act, w2, *layout, weights, None, block_m),
                                distinct * hidden * inter * elem + pairs * inter * elem + pairs * hidden * 4
                                + num_tokens * hidden * elem),
    }
    # each stage's output against its pure-PyTorch twin on the same layout (a wrong kernel publishes no timing)
    expected = {"decode:gate_up": moe.moe_gate_up_torch(x, w13, *layout, pairs_per_token, block_m),
                "decode:down_combine": moe.moe_down_combine_torch(act, w2, *layout, weights, None, block_m)}
    rows = []
    for name, (fn, nbytes) in stages.items():
        out, ref = fn().float(), expected[name].float()
        max_rel_diff = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        stats = time_fn(fn, device, args.warmup, args.iters)
        us = stats["median_us"]
        rows.append({"tokens": num_tokens, "method": name, "block_m": block_m, "distinct_experts": distinct,
                     "bytes": nbytes, "us": us, "min_us": stats["min_us"], "gb_s": nbytes / (us * 1e-6) / 1e9,
                     "frac_hbm": nbytes / (us * 1e-6) / roof["bandwidth_bytes_s"], "max_rel_diff": max_rel_diff,
                     "ok": bool(max_rel_diff <= MAX_RELATIVE_DIFF[dtype])})
    return rows


_DECODE_WEIGHTS = {}


def _decode_weights(stacked, hidden, inter, dtype, device):
    key = (stacked, hidden, inter, dtype, str(device))
    if key not in _DECODE_WEIGHTS:
        gen = torch.Generator(device="cpu").manual_seed(7)
        _DECODE_WEIGHTS.clear()
        _DECODE_WEIGHTS[key] = tuple((torch.randn(*shape, generator=gen) * 0.02).to(dtype).to(device)
                                     for shape in ((stacked, 2 * inter, hidden), (stacked, hidden, inter)))
    return _DECODE_WEIGHTS[key]


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in ("ours", "per_expert_loop", "torch_grouped_mm"):
        pts = [(r["tokens"], r) for r in rows if r["method"] == method and r.get("us") is not None]
        if not pts:
            continue
        left.plot([t for t, _ in pts], [r["us"] for _, r in pts], marker="o", label=method)
        right.plot([t for t, _ in pts], [100 * r["frac_hbm"] for _, r in pts], marker="o", label=method)
    for ax, title in ((left, "routed MoE block, microseconds"), (right, "% of measured HBM bandwidth")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    left.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def check_results(rows):
    """Raises KernelCheckFailed naming every (tokens, method) whose output is off the per-expert loop."""
    wrong = [f"T={r['tokens']} {r['method']}: max relative diff {r['max_rel_diff']:.2e}"
             for r in rows if r.get("ok") is False]
    if wrong:
        raise KernelCheckFailed("wrong results (timings not to be trusted): " + "; ".join(wrong))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", help="default: 1..4096 on GPU, 1..64 on CPU")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--shared", type=int, default=2, help="shared experts folded in (decode section)")
    parser.add_argument("--sections", nargs="+", default=["block", "decode"], choices=["block", "decode"])
    parser.add_argument("--decode-tokens", type=int, nargs="+", default=DECODE_TOKENS)
    parser.add_argument("--hidden", type=int, help="default 2560 on GPU, 256 on CPU")
    parser.add_argument("--inter", type=int, help="default 1728 on GPU, 192 on CPU")
    parser.add_argument("--dtype", default=None, help="bfloat16 on GPU, float32 on CPU (bf16 GEMMs are slow there)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--plot", default=None, help="PNG path (default: next to --json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    tokens = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    hidden = args.hidden or (2560 if on_gpu else 256)
    inter = args.inter or (1728 if on_gpu else 192)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    if on_gpu:
        kernels = "cuda" if extension_built_with_cuda() else "torch"
    else:
        kernels = "cpu" if extension_available() else "torch"
        args.iters = min(args.iters, 5)

    torch.manual_seed(0)
    router = torch.randn(args.experts, hidden, device=device) * 0.1
    roof = {"bandwidth_bytes_s": measure_memory_bandwidth(device), "matmul_flop_s": measure_matmul_peak(device)}
    print(f"device {device}, {dtype}, E={args.experts} k={args.top_k} H={hidden} I={inter}, kernels={kernels}; "
          f"measured {roof['bandwidth_bytes_s'] / 1e12:.2f} TB/s, {roof['matmul_flop_s'] / 1e12:.1f} TFLOP/s")

    rows = []
    if "block" in args.sections:
        w13 = (torch.randn(args.experts, 2 * inter, hidden, device=device) * 0.02).to(dtype)
        w2 = (torch.randn(args.experts, hidden, inter, device=device) * 0.02).to(dtype)
        for num_tokens in tokens:
            rows += bench_tokens(num_tokens, (router, w13, w2), args, device, roof, kernels)
        columns = [("tokens", "T", "{}"), ("method", "method", "{}"), ("distinct_experts", "experts", "{}"),
                   ("us", "us", "{:.1f}"), ("tb_s", "TB/s", "{:.4g}"), ("frac_hbm", "%HBM", "{:.1%}"),
                   ("tflop_s", "TFLOP/s", "{:.4g}"), ("frac_peak", "%peak", "{:.1%}"),
                   ("max_rel_diff", "rel diff", "{:.1e}"), ("error", "error", "{}")]
        print_table(rows, columns)
    if "decode" in args.sections:
        decode_rows = []
        for num_tokens in args.decode_tokens:
            decode_rows += bench_decode_gemm(num_tokens, args, device, roof, kernels, hidden, inter, dtype)
        print(f"\ndecode GEMMs (block_m {moe.DECODE_BLOCK_M}, {args.top_k} routed + {args.shared} shared experts per "
              f"token){'' if on_gpu else ' -- CPU: shape coverage only, not a GPU number'}")
        print_table(decode_rows, [("tokens", "T", "{}"), ("method", "stage", "{}"),
                                  ("distinct_experts", "experts", "{}"), ("bytes", "bytes", "{:.3g}"),
                                  ("us", "us", "{:.1f}"), ("gb_s", "GB/s", "{:.1f}"), ("frac_hbm", "%peak BW", "{:.1%}"),
                                  ("max_rel_diff", "rel diff", "{:.1e}")])
        rows += decode_rows
    payload = {"benchmark": "moe", "machine": machine_info(device), "roofline": roof, "kernels": kernels,
               "shape": {"experts": args.experts, "top_k": args.top_k, "hidden": hidden, "inter": inter,
                         "dtype": str(dtype)}, "results": rows}
    write_json(args.json, payload)
    plot_path = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if plot_path and "block" in args.sections:  # the plot shows the block section
        plot(rows, plot_path)
    check_results(rows)
    return payload


if __name__ == "__main__":
    try:
        main()
    except KernelCheckFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
